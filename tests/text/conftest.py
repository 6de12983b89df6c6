"""Fixtures for tokenizer tests: a large, varied, deterministic text corpus and reference tokenizers."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

# Building blocks that stress each cleanup and pre-tokenizer step. Texts are random mixes of them.
_PIECES: dict[str, list[str]] = {
    "ascii": ["a", "photo", "of", "the", "Dog", "CAT", "diagram", "x", "ZZZ", "hello", "world", "tench"],
    "contractions": ["it's", "they'll", "we've", "I'm", "you're", "don't", "she'd", "'s", "O'Neil", "IT'S"],
    "accents": [
        "café",
        "naïve",
        "Crème brûlée",
        "Ångström",
        "señor",
        "Ærø",
        "Łódź",
        "İstanbul",
        "straße",
        "ẞ",
    ],
    "combining": ["e\u0301", "a\u0308", "n\u0303o", "\u0301alone", "Z\u0351\u0352\u0353algo"],
    "scripts": [
        "日本語",
        "中文字符",
        "한국어",
        "русский",
        "ελληνικά ΣΟΦΙΑ",
        "עברית",
        "العربية",
        "हिन्दी",
        "ไทย",
        "ქართული",
    ],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖🦾", "©", "™", "🏳️‍🌈", "1️⃣"],
    "entities": [
        "&amp;",
        "&lt;b&gt;",
        "&#39;",
        "&#x27;",
        "&nbsp;",
        "&amp;amp;",
        "&amp;lt;",
        "&foo;",
        "&",
        "&copy;",
    ],
    "whitespace": [
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u00a0",
        "\u2003",
        "\u3000",
        "\u2028",
        "\x0b",
        "\x0c",
        "\x85",
    ],
    "numbers": ["0", "123", "3.14", "1,000,000", "½", "²", "٣", "Ⅻ", "१२", "-42", "1e10", "007"],
    "punctuation": [
        "!",
        "?!",
        "...",
        "--",
        "“quoted”",
        "‘single’",
        "«»",
        "(",
        ")",
        "#",
        "@user",
        "http://x.y/z?a=1",
    ],
    "mojibake": ["Ã©", "Ã¨tÃ©", "â€œhiâ€\x9d", "Ã‚", "ÃƒÂ©"],
    "odd": [
        "\x00",
        "\x1b[31m",
        "\x7f",
        "\u200b",
        "\u200d",
        "\ufeff",
        "ﬁ",
        "Ａｂｃ",
        "\U0001d400",
        "\x1c",
        "\u180e",
    ],
}


def _make_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = list(_PIECES)
    texts = ["", " ", "\n\t ", "a", "A", "&", "'", "''", "..."]
    texts += [p for pieces in _PIECES.values() for p in pieces]  # every piece on its own
    for _ in range(n):
        count = rng.choice([1, 2, 3, 5, 8, 13, 40])
        parts = [rng.choice(_PIECES[rng.choice(kinds)]) for _ in range(count)]
        joiner = rng.choice([" ", "", "  ", "\t"])
        texts.append(joiner.join(parts))
    # Very long texts: far beyond 77 tokens, and exactly around the limit.
    texts.append(" ".join(["word"] * 500))
    texts.append("日本語" * 300)
    texts.append("a" * 5000)
    texts += [" ".join(["x"] * k) for k in (73, 74, 75, 76, 77)]
    return texts


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """~3,000 texts mixing unicode, emoji, CJK, accents, entities, whitespace runs, numbers, long texts."""
    return _make_corpus(3000, seed=0)


@pytest.fixture(scope="session")
def open_clip_tokenizer():  # type: ignore[no-untyped-def]
    """open_clip's SimpleTokenizer (OpenAI's algorithm; only its special-token names differ)."""
    tokenizer = pytest.importorskip("open_clip.tokenizer")
    return tokenizer.SimpleTokenizer()


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """transformers' CLIPTokenizer built offline from the same vocabulary (vocab.json + merges.txt)."""
    transformers = pytest.importorskip("transformers")
    from clipengine.text.tokenizer import get_tokenizer

    folder: Path = tmp_path_factory.mktemp("hf_clip_tokenizer")
    ids = get_tokenizer()._ids
    (folder / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
    vocab_gz = Path(__file__).parents[2] / "src/clipengine/assets/bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(vocab_gz.read_bytes()).decode("utf-8").split("\n")
    merges = "\n".join(lines[1 : 49152 - 256 - 2 + 1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local folder; never look anything up online
        return transformers.CLIPTokenizer.from_pretrained(str(folder))
