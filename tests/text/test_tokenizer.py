"""Tokenizer: token-for-token parity with open_clip / OpenAI and transformers, truncation, no torch."""

from __future__ import annotations

import html
import logging
import subprocess
import sys
from pathlib import Path

import ftfy
import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipengine.errors import BackendError, InputError, TextTooLongError
from clipengine.text.tokenizer import (
    _PRE_TOKEN,
    _PRE_TOKEN_ASCII,
    EOT_TOKEN,
    SOT_TOKEN,
    VOCAB_SIZE,
    Tokenizer,
    _clean,
    get_tokenizer,
    tokenize,
)

# open_clip renamed the special tokens to <start_of_text>/<end_of_text>; OpenAI's (and ours) are
# <|startoftext|>/<|endoftext|>. Texts containing either spelling are compared in their own tests.
_SPECIAL_SPELLINGS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


def _openai_clean(text: str) -> str:
    """OpenAI simple_tokenizer's cleanup, restated independently of `_clean`'s shortcut."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _no_special(texts: list[str]) -> list[str]:
    return [t for t in texts if not any(s in t.lower() for s in _SPECIAL_SPELLINGS)]


def test_vocabulary_size_and_special_ids() -> None:
    tok = get_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (SOT_TOKEN, EOT_TOKEN) == (49406, 49407)
    assert tok.decode([SOT_TOKEN, EOT_TOKEN]) == "<|startoftext|><|endoftext|>"


def test_known_ids() -> None:
    assert get_tokenizer().encode("a diagram") == [320, 22697]
    assert tokenize(["a dog"])[0, :4].tolist() == [SOT_TOKEN, 320, 1929, EOT_TOKEN]


def test_encode_equals_open_clip_on_corpus(corpus: list[str], open_clip_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = get_tokenizer()
    mismatches = [t for t in _no_special(corpus) if tok.encode(t) != open_clip_tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize("context_length", [77, 16, 5, 2])
def test_tokenize_equals_open_clip_including_truncation(
    corpus: list[str],
    open_clip_tokenizer,
    context_length: int,  # type: ignore[no-untyped-def]
) -> None:
    texts = _no_special(corpus)
    if context_length != 77:  # short contexts truncate nearly everything; a sample is enough
        texts = texts[::5]
    ours = tokenize(texts, context_length=context_length)
    reference = open_clip_tokenizer(texts, context_length=context_length).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(texts), context_length)
    np.testing.assert_array_equal(ours, reference)


def test_equals_transformers_where_it_cleans_the_same_way(corpus: list[str], hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """transformers' CLIPTokenizer skips ftfy and HTML unescaping; elsewhere it must agree, and it
    shares OpenAI's handling of a literal "<|endoftext|>" in the text, which open_clip cannot check."""
    texts = [t for t in corpus if ftfy.fix_text(t) == t and "&" not in t]
    texts += ["it's <|endoftext|> here", "<|startoftext|>a<|endoftext|>"]
    assert len(texts) > 500
    tok = get_tokenizer()
    mismatches = [t for t in texts if tok.encode(t) != hf_tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"


def test_literal_special_token_text_maps_to_special_id_like_openai() -> None:
    assert get_tokenizer().encode("a <|endoftext|>") == [320, EOT_TOKEN]
    assert get_tokenizer().encode("<|StartOfText|>") == [SOT_TOKEN]  # OpenAI's pattern ignores case


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_hypothesis_text_equals_open_clip(open_clip_tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    if _no_special([text]):
        assert get_tokenizer().encode(text) == open_clip_tokenizer.encode(text)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(max_codepoint=0x7F), max_size=40) | st.text(max_size=20))
def test_ascii_shortcut_of_cleanup_equals_full_cleanup(text: str) -> None:
    assert _clean(text) == _openai_clean(text)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
def test_ascii_pre_tokenizer_equals_unicode_pre_tokenizer(text: str) -> None:
    assert _PRE_TOKEN_ASCII.findall(text) == _PRE_TOKEN.findall(text)


def test_decode_round_trips_cleaned_text(corpus: list[str]) -> None:
    tok = get_tokenizer()
    for text in _no_special(corpus)[:500]:
        cleaned = _openai_clean(text)
        # Pre-tokens are separated by word ends, so spaces come back between them, not inside words.
        assert tok.decode(tok.encode(text)).replace(" ", "") == cleaned.replace(" ", "")


def test_long_text_is_truncated_with_warning_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    text = "a very long caption " + "word " * 100
    with caplog.at_level(logging.WARNING, logger="clipengine.text.tokenizer"):
        row = tokenize(text)[0]
    assert row[0] == SOT_TOKEN and row[-1] == EOT_TOKEN and (row != 0).all()
    (record,) = caplog.records
    assert "'a very long caption word" in record.getMessage()
    assert "106 tokens" in record.getMessage()


@pytest.mark.parametrize("truncate", [False, "strict"])
def test_long_text_raises_when_truncation_refused(truncate: bool | str) -> None:
    with pytest.raises(TextTooLongError, match=r"'a very long caption word word.*' is 106 tokens long"):
        tokenize(["short", "a very long caption " + "word " * 100], truncate=truncate)  # type: ignore[arg-type]


def test_text_that_fits_exactly_is_not_truncated(caplog: pytest.LogCaptureFixture) -> None:
    text = " ".join(["x"] * 75)  # 75 + SOT + EOT = 77
    with caplog.at_level(logging.WARNING):
        row = tokenize(text, truncate="strict")[0]
    assert row[76] == EOT_TOKEN and not caplog.records


def test_empty_and_single_text_inputs() -> None:
    assert tokenize("").tolist() == [[SOT_TOKEN, EOT_TOKEN] + [0] * 75]
    assert tokenize([]).shape == (0, 77)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"context_length": 1}, r"context_length must be an integer >= 2"),
        # These were raw TypeErrors from `<` or np.zeros.
        ({"context_length": "77"}, r"context_length must be an integer >= 2 .*got '77'"),
        ({"context_length": 77.0}, r"context_length must be an integer >= 2 .*got 77.0"),
        ({"context_length": None}, r"context_length must be an integer >= 2 .*got None"),
        ({"truncate": "yes"}, r"truncate must be True, False"),
    ],
)
def test_invalid_arguments_are_input_errors(bad: dict[str, object], match: str) -> None:
    """Argument checks raise InputError, as the texts check does; still a ValueError, as they were."""
    with pytest.raises(InputError, match=match) as info:
        tokenize("a", **bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("ids", [[-1], [VOCAB_SIZE], [320, 10**9], np.array([320, -5])])
def test_decode_refuses_ids_outside_the_vocabulary(ids: object) -> None:
    # -1 used to index from the end and decode as "<|endoftext|>"; past the end was a raw IndexError.
    with pytest.raises(InputError, match=rf"outside the vocabulary \[0, {VOCAB_SIZE}\)"):
        get_tokenizer().decode(ids)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ids",
    [[1.0], [320, "22697"], [None], [True], np.array([320.0]), np.array([[320, 22697]]), None, "320", 320],
)
def test_decode_refuses_non_integer_ids(ids: object) -> None:
    with pytest.raises(InputError, match="integer"):
        get_tokenizer().decode(ids)  # type: ignore[arg-type]


def test_decode_accepts_numpy_integer_ids() -> None:
    tok = get_tokenizer()
    assert tok.decode(np.array([320, 22697], dtype=np.int32)) == tok.decode([320, 22697]) == "a diagram "
    assert tok.decode(tokenize("a dog")[0, :4]) == "<|startoftext|>a dog <|endoftext|>"


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        (None, "NoneType"),
        (5, "int"),
        ({"a": 1}, "dict"),
        (b"a dog", "bytes"),
        (["a dog", 5], r"texts\[1\] is int"),
        ([None], r"texts\[0\] is NoneType"),
        (memoryview(b"a dog"), "got memoryview"),  # a Sequence, but of ints: refused as bytes are
        (np.array("a dog"), r"got a 0-D array \(\)"),  # list() of it was a raw TypeError
        (np.array([["a dog", "a cat"]]), r"got a 2-D array \(1, 2\)"),
    ],
)
def test_tokenize_refuses_texts_that_are_not_strings(texts: object, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        tokenize(texts)  # type: ignore[arg-type]
    assert isinstance(info.value, BackendError)  # code that caught BackendError for these still does
    with pytest.raises(InputError, match=match):
        get_tokenizer()(texts)  # type: ignore[arg-type]


def test_tokenize_accepts_a_numpy_array_of_strings() -> None:
    assert np.array_equal(tokenize(np.array(["a dog", "a cat"])), tokenize(["a dog", "a cat"]))  # type: ignore[arg-type]


def test_custom_vocabulary_file_matches_bundled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib.resources

    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(
        importlib.resources.files("clipengine.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    )
    assert Tokenizer(path).encode("Crème brûlée 😀") == get_tokenizer().encode("Crème brûlée 😀")


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, clipengine.text.tokenizer as t; t.tokenize('a dog'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "No such file"),  # was a bare FileNotFoundError
        (b"not gzip", "Not a gzipped file"),  # was gzip.BadGzipFile
        (b"gz-utf8", "can't decode"),  # was UnicodeDecodeError
        (b"gz-cut", "end-of-stream"),  # was EOFError
        (b"gz-short", "expected 48894 merge lines"),
    ],
)
def test_unreadable_vocabulary_file_is_an_input_error_naming_it(
    tmp_path: Path, content: bytes | None, match: str
) -> None:
    import gzip

    path = tmp_path / "vocab.txt.gz"
    data = {
        b"gz-utf8": gzip.compress(b"\xff\xfe"),
        b"gz-cut": gzip.compress(b"#version\na b\n" * 100)[:-12],
        b"gz-short": gzip.compress(b"#version\na b\n"),
    }
    if content is not None:
        path.write_bytes(data.get(content, content))
    with pytest.raises(InputError, match=match) as info:
        Tokenizer(path)
    assert "vocab.txt.gz" in str(info.value) and isinstance(info.value, ValueError)
