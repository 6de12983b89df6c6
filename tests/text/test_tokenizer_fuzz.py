"""Seeded fuzzing of the tokenizer against OpenAI's simple_tokenizer and transformers' CLIPTokenizer.

The reference is OpenAI's: open_clip's SimpleTokenizer (OpenAI's BPE code, copied) with OpenAI's two
remaining details put back: the special-token names <|startoftext|>/<|endoftext|> and the whitespace
cleanup `regex.sub(r"\\s+", " ", ...)` (open_clip uses str.split). transformers is compared only
where its documented differences (docs/tokenizer_preprocess.md) do not apply.
"""

from __future__ import annotations

import html
import random
import unicodedata

import ftfy
import numpy as np
import pytest
import regex

from clipengine.text.tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer, tokenize

_OPENAI_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Pieces for each kind of input the tokenizer must get right; texts are random mixes of them and
# of random code points from every plane.
_PIECES: dict[str, list[str]] = {
    "accents": "é E\u0301 ü Ñ ø Ł İ ß ẞ ǅ Ω ΣΑΣ ﬀ".split(),
    "cjk": "日本 語 中文 한국어 ｶﾀｶﾅ Ａ 〜 。".split(),
    # Skin tone, ZWJ sequence, flag, tag sequence (England), variation selector, keycap.
    "emoji": "😀 👍🏿 👩\u200d💻 🇯🇵 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f ❤\ufe0f #\ufe0f\u20e3".split(),
    "combining": "\u0300 \u0301\u0302\u0303 \u0489 \u20dd a\u0328\u0301 \u034f".split(),
    "rtl": "שלום مرحبا \u202e \u202d \u200f \u061c ܐ ދ".split(),
    "zero_width": "\u200b \u200c \u200d \u2060 \ufeff \u00ad \u180e".split(),
    "control": "\x00 \x01 \x07 \x1b[0m \x1c \x1f \x7f \x85 \x9b \ud800 \udfff".split(" "),
    "entities": "&amp; &lt; &gt; &quot; &#39; &#x2F; &#0; &#xd800; &#1114112; &#28; &amp;amp; &amp;#39; "
    "&nbsp; &eacute &notit; & &# &#x;".split(),
    "whitespace": " |   |\n|\n\n\n|\t|\t\t|\r\n|\r|\x0b|\x0c|\u00a0|\u2002|\u3000|\u2028|\u2029|\u1680|\u205f".split(
        "|"
    ),
    "punctuation": "! ?!? ... … — - ( ] “ ” ‘ ’ « ' \" @ # $ % ^ * / \\ | ~ ` < > <| |>".split(),
    "numbers": "0 7 42 3.14 1,000 -5 1e-9 ٣ ५ Ⅳ ½ ² ₃ ① １２".split(),
    "contractions": "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve 'M 'LL 'D it's don't we're I've I'm you'll he'd ’s ''s 'ss".split(),
    "words": "a photo of the Dog CAT PhOtO tench x QQQ antidisestablishment".split(),
    "special": "<|endoftext|> <|StartOfText|> <|startoftext|> <start_of_text> <|endoftext".split(),
    "mojibake": "Ã© â€™ Ã¢â‚¬â„¢ Ãƒ".split(),
}


def _random_char(rng: random.Random) -> str:
    """One code point from anywhere: ASCII, controls, the BMP, astral planes, unassigned, surrogates."""
    low, high = rng.choice([(0x20, 0x7F), (0, 0x20), (0x80, 0x800), (0x800, 0x10000), (0x10000, 0x110000)])
    return chr(rng.randrange(low, high))


def _random_text(rng: random.Random) -> str:
    kinds = list(_PIECES)
    parts: list[str] = []
    for _ in range(rng.choice([1, 2, 4, 8, 16, 40])):
        if rng.random() < 0.2:
            parts.append(_random_char(rng))
        else:
            piece = rng.choice(_PIECES[rng.choice(kinds)])
            parts.append(piece.upper() if rng.random() < 0.1 else piece)
    return rng.choice(["", " ", "  ", "\t", "\n"]).join(parts)


def _fuzz_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n\t\r ", "\x00", "...", "'", "''", "'s", "0123456789", "&amp;" * 3]
    texts += [_random_text(rng) for _ in range(n)]
    # Around and far past the context length: each "x" is one token, each "日本" is several.
    texts += [" ".join(["x"] * k) for k in (74, 75, 76, 77, 200)]
    texts += ["日本" * 100, "a" * 3000, "😀" * 80, "&amp;" * 200, "it's " * 60, " \n\t" * 500 + "end"]
    return texts


@pytest.fixture(scope="module")
def fuzz_corpus() -> list[str]:
    return _fuzz_corpus(2500, seed=20261127)


def _openai_clean(text: str) -> str:
    """clip/simple_tokenizer.py: whitespace_clean(basic_clean(text)).lower()."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


@pytest.fixture(scope="module")
def openai_tokenizer():  # type: ignore[no-untyped-def]
    """open_clip's copy of OpenAI's SimpleTokenizer with OpenAI's special-token names and cleanup restored."""
    tokenizer = pytest.importorskip("open_clip.tokenizer")
    tok = tokenizer.SimpleTokenizer()
    for name, token_id in (("<|startoftext|>", SOT_TOKEN), ("<|endoftext|>", EOT_TOKEN)):
        tok.encoder[name] = token_id
        tok.cache[name] = name
    tok.pat = regex.compile(_OPENAI_PATTERN, regex.IGNORECASE)
    tok.clean_fn = _openai_clean
    return tok


def _openai_tokenize(tok, texts: list[str], context_length: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """clip.tokenize(texts, context_length, truncate=True)."""
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *tok.encode(text), EOT_TOKEN]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT_TOKEN
        out[row, : len(ids)] = ids
    return out


def test_fuzz_encode_equals_openai(fuzz_corpus: list[str], openai_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = get_tokenizer()
    mismatches = [t for t in fuzz_corpus if tok.encode(t) != openai_tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(fuzz_corpus)} texts differ, e.g. {mismatches[:3]!r}"


def _long_words(n: int, seed: int) -> list[str]:
    """Single pre-tokens of 25-400 letters (the heap merge's range, `_HEAP_MERGE_SYMBOLS`): random
    letters, few-letter alphabets (repeats: overlapping pairs, "a a a"), real words run together,
    accented and CJK letters (several byte symbols each)."""
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "ab", "aeiou", "etaoinshrdlu", "xyzq", "éüñøßàç", "日本語中文한국"]
    words = "photo dog cat the of tench antidisestablishment quick brown".split()
    out = []
    for _ in range(n):
        length = rng.choice([25, 26, 40, 77, 150, 400])
        if rng.random() < 0.2:
            run = ""
            while len(run) <= length:
                run += rng.choice(words)
            out.append(run)
        else:
            alphabet = rng.choice(alphabets)
            out.append("".join(rng.choice(alphabet) for _ in range(length)))
    return out


def test_long_words_encode_equals_openai(openai_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Long pre-tokens take the heap merge (O(n log n)); the reference rescans the word per round."""
    from clipengine.text import tokenizer as tokenizer_module

    tok = tokenizer_module.Tokenizer()  # its own caches: every word is merged here, not looked up
    texts = _long_words(300, seed=7)
    assert all(len(t.encode()) > tokenizer_module._HEAP_MERGE_SYMBOLS for t in texts)  # byte symbols
    mismatches = [t for t in texts if tok.encode(t) != openai_tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} long words differ, e.g. {mismatches[:2]!r}"


def test_heap_merge_equals_the_plain_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same symbols from both merge loops, on words around the switch-over length too."""
    from clipengine.text import tokenizer as tokenizer_module

    tok = tokenizer_module.Tokenizer()
    rng = random.Random(11)
    words = _long_words(200, seed=3)
    words += ["".join(rng.choice("abc") for _ in range(k)) for k in range(2, 40)]
    symbol_lists = [[*w[:-1], w[-1] + "</w>"] for w in words]
    heap = [tok._merge_long(list(symbols)) for symbols in symbol_lists]
    monkeypatch.setattr(tokenizer_module, "_HEAP_MERGE_SYMBOLS", 10**9)  # the plain rounds only
    plain = [tok._merge(list(symbols)) for symbols in symbol_lists]
    assert heap == plain


@pytest.mark.parametrize("context_length", [77, 9])
def test_fuzz_tokenize_equals_openai_including_truncation(
    fuzz_corpus: list[str],
    openai_tokenizer,  # type: ignore[no-untyped-def]
    context_length: int,
) -> None:
    ours = tokenize(fuzz_corpus, context_length=context_length)
    np.testing.assert_array_equal(ours, _openai_tokenize(openai_tokenizer, fuzz_corpus, context_length))
    # Every row: SOT, ids, EOT kept at the end even when cut, then padding. (Id 0 is "!", so the
    # padding is found from the text's length, not by looking for zeros.)
    tok = get_tokenizer()
    lengths = np.array([min(len(tok.encode(t)) + 2, context_length) for t in fuzz_corpus])
    assert (ours[:, 0] == SOT_TOKEN).all()
    assert (ours[np.arange(len(ours)), lengths - 1] == EOT_TOKEN).all()
    assert all((row[n:] == 0).all() for row, n in zip(ours, lengths, strict=True))
    assert (lengths == context_length).any() and (lengths < context_length).any()


def test_fuzz_decode_equals_openai(openai_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Random id runs, byte-level ids over-represented so that invalid UTF-8 (-> U+FFFD) is common.
    Special ids are left out: open_clip's decoder spells them <start_of_text>/<end_of_text>."""
    rng = random.Random(77)
    tok = get_tokenizer()
    for _ in range(3000):
        ids = [
            rng.randrange(512) if rng.random() < 0.3 else rng.randrange(SOT_TOKEN)
            for _ in range(rng.randrange(20))
        ]
        assert tok.decode(ids) == openai_tokenizer.decode(ids), ids


def _hf_cleans_like_openai(text: str) -> bool:
    """Texts outside every documented transformers difference (docs/tokenizer_preprocess.md)."""
    fixed = html.unescape(html.unescape(ftfy.fix_text(text)))
    return (
        fixed == text  # transformers skips ftfy and HTML unescaping
        # OpenAI's special-token match ignores case and needs a pre-token boundary; transformers'
        # is case-sensitive and matches anywhere, e.g. in "!<|endoftext|>".
        and "oftext|>" not in text.lower()
        and "Σ" not in text  # Python's lower() writes a word-final capital sigma as ς, transformers σ
        # Code points unassigned in Python's Unicode tables: the two regex engines class them differently.
        and all(unicodedata.category(c) not in ("Cn", "Co") for c in text)
    )


def test_fuzz_encode_equals_transformers_outside_documented_differences(
    fuzz_corpus: list[str],
    hf_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    tok = get_tokenizer()
    texts = [t for t in fuzz_corpus if _hf_cleans_like_openai(t)]
    assert len(texts) > 300
    mismatches = [t for t in texts if tok.encode(t) != hf_tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize(
    "text",
    [
        "&amp; &lt;b&gt;",  # HTML entities: OpenAI unescapes, transformers does not
        "Ã©tÃ©",  # mojibake: ftfy repairs it to "été"
        "ΟΔΟΣ",  # word-final capital sigma: Python's lower() gives ς, transformers σ
        "\U0003ee72's",  # an unassigned code point before 's: the regex engines split it differently
        "<|EndOfText|>",  # OpenAI's special-token match ignores case, transformers' does not
        "wow!<|endoftext|>",  # OpenAI reads "!<|" as one pre-token, so no special id; transformers splits
    ],
)
def test_documented_transformers_differences_are_real(
    text: str,
    openai_tokenizer,  # type: ignore[no-untyped-def]
    hf_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """Where docs/tokenizer_preprocess.md says transformers differs, we side with OpenAI."""
    ours = get_tokenizer().encode(text)
    assert ours == openai_tokenizer.encode(text)
    assert ours != hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_transformers_refuses_lone_surrogates_that_openai_repairs(openai_tokenizer, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    # ftfy turns a lone surrogate into U+FFFD; transformers' Rust tokenizer cannot take the str at all.
    ours = get_tokenizer().encode("a\ud800b")
    assert ours == openai_tokenizer.encode("a\ud800b") == get_tokenizer().encode("a\ufffdb")
    with pytest.raises(TypeError):
        hf_tokenizer("a\ud800b", add_special_tokens=False)
