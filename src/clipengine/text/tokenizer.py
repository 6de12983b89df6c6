"""CLIP's byte-level BPE tokenizer: text -> (N, L) int64 token ids, identical to OpenAI's, without torch."""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.resources
import logging
import operator
import re
import threading
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Literal

import ftfy
import numpy as np
import regex

from clipengine.errors import InputError, TextTooLongError
from clipengine.types import IntArray

__all__ = [
    "CONTEXT_LENGTH",
    "EOT_TOKEN",
    "SOT_TOKEN",
    "VOCAB_SIZE",
    "Tokenizer",
    "as_str_list",
    "get_tokenizer",
    "tokenize",
]

logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 77  # L of every released CLIP text tower
VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48894 merges + 2 specials
SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>; the text tower pools at its position (argmax of the ids)

_SOT_TEXT = "<|startoftext|>"
_EOT_TEXT = "<|endoftext|>"
_WORD_END = "</w>"  # suffix marking the last symbol of a pre-token
_N_MERGES = 49152 - 256 - 2  # OpenAI keeps this many merge rules of the file (line 1 is a header)
_BPE_CACHE_SIZE = 1 << 16  # distinct pre-tokens remembered; prompts reuse a small vocabulary
_TEXT_CACHE_SIZE = 4096  # whole texts remembered: zero-shot labels and templates recur on every call
_WARN_TEXT_CHARS = 80  # how much of an over-long text a warning or error quotes
# Pre-tokens longer than this merge through a heap (`_merge_long`): the reference's rounds rescan
# the word each time, O(n^2), and a 1000-letter random "word" took 0.11 s; short words stay on
# the plain loop, which is faster for them.
_HEAP_MERGE_SYMBOLS = 24

# OpenAI's pre-tokenizer. The special-token alternatives mean a text that literally contains
# "<|endoftext|>" gets the special id, exactly like the reference (kept for parity, see docs).
_PRE_TOKEN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The same pattern for printable ASCII, where \p{L} is [a-zA-Z] and \p{N} is [0-9]: the stdlib `re`
# runs it ~10x faster than `regex` with Unicode classes (tests/text check both agree).
_PRE_TOKEN_ASCII = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+""",
    re.ASCII | re.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")  # the `regex` module's \s, as OpenAI uses (differs from str.split)

Truncate = bool | Literal["strict"]


def _byte_symbols() -> dict[int, str]:
    """Byte -> the printable character standing for it (GPT-2's reversible byte mapping).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are shifted
    to U+0100 and up, so every BPE symbol is a visible character and no byte is lost. The dict's
    order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in symbols]
    for offset, b in enumerate(shifted):
        symbols[b] = chr(256 + offset)
    return symbols


# str.translate table applied to text decoded as Latin-1 (code point == byte value): bytes -> symbols.
_BYTES_TO_SYMBOLS = _byte_symbols()
_SYMBOLS_TO_BYTES = {s: b for b, s in _BYTES_TO_SYMBOLS.items()}


def _clean(text: str) -> str:
    """OpenAI's normalisation: ftfy, HTML-unescape twice, collapse whitespace, lowercase.

    Printable ASCII without '&' is a fixed point of ftfy and html.unescape (ftfy only rewrites
    non-ASCII, control characters and entities), so the common case skips the ~30 µs ftfy call;
    tests/text check that shortcut against ftfy itself.
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        # Only ' ' can be whitespace here, so str.split agrees with the regex below.
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    collapsed: str = _WHITESPACE.sub(" ", text)
    return collapsed.strip().lower()


def _read_bpe_file(path: str | Path | None) -> list[str]:
    """Lines of the gzipped merges file; the bundled vocabulary unless `path` is given.

    Raises:
        InputError: `path` cannot be read, or is not gzipped UTF-8 text (was a bare OSError,
            BadGzipFile, EOFError or UnicodeDecodeError).
    """
    if path is None:
        data = (
            importlib.resources.files("clipengine.assets")
            .joinpath("bpe_simple_vocab_16e6.txt.gz")
            .read_bytes()
        )
        return gzip.decompress(data).decode("utf-8").split("\n")
    try:
        return gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # BadGzipFile is an OSError
        raise InputError(
            f"{path}: not a readable gzipped CLIP merges file such as bpe_simple_vocab_16e6.txt.gz ({e})"
        ) from e


class Tokenizer:
    """CLIP's byte-level BPE with OpenAI's vocabulary, cleanup and special tokens.

    Args:
        bpe_path: gzipped merges file; defaults to the vocabulary bundled with clipengine.

    Raises:
        InputError: `bpe_path` cannot be read, is not gzipped UTF-8, or does not hold the 48894
            merge lines of CLIP's vocabulary (an InputError is a ValueError, as this was).

    Example:
        >>> tok = Tokenizer()
        >>> tok.encode("a diagram")
        [320, 22697]
        >>> tok(["a diagram", "a dog"]).shape
        (2, 77)
    """

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        lines = _read_bpe_file(bpe_path)
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise InputError(
                f"{bpe_path or 'bundled vocabulary'}: expected {_N_MERGES} merge lines of two symbols"
            )
        byte_symbols = list(_BYTES_TO_SYMBOLS.values())
        vocab = [*byte_symbols, *(s + _WORD_END for s in byte_symbols)]
        vocab += ["".join(m) for m in merges]
        vocab += [_SOT_TEXT, _EOT_TEXT]
        self._ids: dict[str, int] = {symbol: i for i, symbol in enumerate(vocab)}
        self._symbols: list[str] = vocab
        # Lower rank = merged earlier.
        self._ranks: dict[tuple[str, str], int] = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        # Per-instance caches so two tokenizers with different vocabularies never share entries.
        self._bpe_ids = lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe_uncached)
        self._text_ids = lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._encode_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self._symbols)

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merge rules to one pre-token until none applies, lowest rank first.

        Each round merges every occurrence of the best-ranked adjacent pair, left to right and
        without overlap ("a a a" + rule "a a" -> "aa a"), which is what the reference does.
        """
        if len(symbols) > _HEAP_MERGE_SYMBOLS:
            return self._merge_long(symbols)
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _merge_long(self, symbols: list[str]) -> list[str]:
        """`_merge` in O(n log n): the same rounds, each pair found through a heap, not a rescan.

        The symbols form a linked list (`after[i]` / `before[i]`: the next / previous live index,
        -1 at the ends). The heap holds (rank, index of the left symbol, left, right) for every
        adjacent pair with a rule; an entry whose symbols have changed since is skipped. A round
        takes every entry of the lowest rank, in index order, i.e. left to right, and merges
        those still valid: an overlapping one ("a a a") is not, as in the reference. Merging two
        symbols never makes a pair of the round's own rule again (the merged symbol is longer
        than both parts), so the pairs a round creates are pushed for later rounds.
        """
        ranks = self._ranks
        live = list(symbols)
        after = [*range(1, len(live)), -1]
        before = list(range(-1, len(live) - 1))
        heap = [(rank, i, a, b) for i, (a, b) in enumerate(pairwise(live)) if (rank := ranks.get((a, b))) is not None]
        heapq.heapify(heap)

        def push(i: int) -> None:  # the pair starting at live index i, if it has a rule
            j = after[i]
            if i >= 0 and j >= 0 and (rank := ranks.get((live[i], live[j]))) is not None:
                heapq.heappush(heap, (rank, i, live[i], live[j]))

        while heap:
            rank = heap[0][0]
            round_entries = []
            while heap and heap[0][0] == rank:
                round_entries.append(heapq.heappop(heap))
            for _, i, first, second in round_entries:
                j = after[i]
                if live[i] != first or j < 0 or live[j] != second:
                    continue  # stale: a symbol of this pair was merged since it was pushed
                live[i] = first + second
                live[j] = ""  # dropped from the list; never equal to a symbol
                after[i] = after[j]
                if after[j] >= 0:
                    before[after[j]] = i
                push(before[i])
                push(i)
        out, i = [], 0
        while i >= 0:
            out.append(live[i])
            i = after[i]
        return out

    def _bpe_uncached(self, pre_token: str) -> tuple[int, ...]:
        """Token ids of one byte-symbol pre-token (its last symbol carries the word-end mark)."""
        if pre_token in (_SOT_TEXT, _EOT_TEXT):
            return (self._ids[pre_token],)
        symbols = [*pre_token[:-1], pre_token[-1] + _WORD_END]
        return tuple(self._ids[s] for s in self._merge(symbols))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` after cleanup, without start/end tokens."""
        return list(self._text_ids(text))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        bpe_ids = self._bpe_ids
        cleaned = _clean(text)
        if cleaned.isascii() and cleaned.isprintable():
            # Printable ASCII bytes are their own symbols and pre-tokens hold no spaces: no mapping.
            for pre_token in _PRE_TOKEN_ASCII.findall(cleaned):
                ids += bpe_ids(pre_token)
            return tuple(ids)
        for pre_token in _PRE_TOKEN.findall(cleaned):
            # UTF-8 bytes -> one symbol per byte (Latin-1 decoding maps byte b to code point b).
            ids += bpe_ids(pre_token.encode("utf-8").decode("latin-1").translate(_BYTES_TO_SYMBOLS))
        return tuple(ids)

    def decode(self, ids: Sequence[int] | IntArray) -> str:
        """Text of token ids; word ends become spaces and invalid UTF-8 becomes U+FFFD (as OpenAI).

        Special tokens decode to their names; padding zeros decode to "!", so pass only the ids
        up to and including the end token of a `tokenize` row.

        Raises:
            InputError: `ids` is not a sequence of integers, or one is outside [0, vocab_size)
                (the same rule, and error, as the backends apply to token ids they encode).
        """
        joined = "".join(self._symbols[i] for i in self._checked_ids(ids))
        return (
            bytes(_SYMBOLS_TO_BYTES[c] for c in joined)
            .decode("utf-8", errors="replace")
            .replace(_WORD_END, " ")
        )

    def _checked_ids(self, ids: object) -> list[int]:
        """`ids` as Python ints, each a vocabulary index; anything else is an InputError naming it.

        Without the check -1 indexes from the end of the vocabulary (decodes as "<|endoftext|>"),
        a float id is silently truncated by int(), and ids past the end are a bare IndexError.
        """
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(
                    f"token ids must be a 1-D array of integer ids, got {ids.dtype} {ids.shape}; "
                    "decode one row of a tokenize() array at a time"
                )
        elif isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise InputError(f"token ids must be a sequence of integer ids, got {type(ids).__name__}")
        size = len(self._symbols)
        checked: list[int] = []
        for pos, i in enumerate(ids):
            # bool is an int subclass, but True as a token id is a mistake, not id 1.
            if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
                raise InputError(
                    f"token id at position {pos} is {i!r} ({type(i).__name__}), not an integer id"
                )
            if not 0 <= i < size:
                raise InputError(
                    f"token id {int(i)} at position {pos} is outside the vocabulary [0, {size}); "
                    "pass ids made by this tokenizer"
                )
            checked.append(int(i))
        return checked

    def __call__(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: Truncate = True
    ) -> IntArray:
        """Tokenize texts into a zero-padded (N, L) int64 array: SOT, ids, EOT, zeros.

        Args:
            texts: one text or a sequence of texts.
            context_length: L, the number of positions per row (77 for all released CLIP models).
            truncate: True cuts an over-long text to L positions ending in EOT (as open_clip and
                OpenAI's `truncate=True` do) and logs a warning naming it; False or "strict"
                raises instead.

        Returns:
            (N, L) int64 token ids.

        Raises:
            TextTooLongError: a text needs more than L positions and truncation is off.
            InputError: `texts` is not a text or a sequence of texts (None, a number, a dict, ...),
                `context_length` is not an integer >= 2, or an unknown `truncate` value.
        """
        texts = _text_list(texts)
        try:
            length = operator.index(context_length)  # an int or a NumPy integer, not 77.0 or "77"
        except TypeError:
            length = 0
        if isinstance(context_length, bool) or length < 2:
            raise InputError(
                f"context_length must be an integer >= 2 (room for start and end tokens), got {context_length!r}"
            )
        context_length = length
        if truncate not in (True, False, "strict"):
            raise InputError(f"truncate must be True, False or 'strict', got {truncate!r}")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [SOT_TOKEN, *self._text_ids(text), EOT_TOKEN]
            if len(ids) > context_length:
                if truncate is not True:
                    raise TextTooLongError(
                        f"text {_quote(text)} is {len(ids)} tokens long (with start/end tokens), more than "
                        f"the context length {context_length}; shorten it or pass truncate=True"
                    )
                logger.warning(
                    "text %s is %d tokens long, truncated to the context length %d",
                    _quote(text),
                    len(ids),
                    context_length,
                )
                ids = ids[:context_length]
                ids[-1] = EOT_TOKEN
            out[row, : len(ids)] = ids
        return out


def _text_list(texts: object) -> list[str]:
    """One text or a sequence of texts as a list; anything else is an InputError naming it.

    Checked up front: a dict, None or an int would otherwise fail deep in the cleanup with a bare
    TypeError/AttributeError (or, for a dict, silently tokenize its keys).
    """
    if isinstance(texts, str):
        return [texts]
    return as_str_list(texts, "texts", "a str or a list of str", "decode bytes first and wrap one text in a list if needed")


def as_str_list(value: object, name: str, expected: str, fix: str) -> list[str]:
    """`value`, a list, tuple or 1-D NumPy array of str (a DataFrame column), as a list of str.

    Shared by every argument that is a list of texts (`tokenize`'s texts, `ClipModel`'s labels and
    templates), so they accept and refuse the same things.

    Args:
        value: what the caller passed.
        name: the argument's name, for the message ("texts", "labels").
        expected: what it must be ("a list of labels").
        fix: what to do instead, appended to the message when `value` as a whole is wrong.

    Raises:
        InputError: bytes (a Sequence, but of ints), a dict (refused rather than read as its keys), a
            set (no order), None, a number, an array that is not 1-D (list() of a 0-D one is a bare
            TypeError), or an item that is not a str (named by its position).
    """
    if isinstance(value, bytes | bytearray | memoryview) or not isinstance(value, Sequence | np.ndarray):
        raise InputError(
            f"{name} must be {expected}, got {type(value).__name__}; {_whole_value_fix(value, name, fix)}"
        )
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise InputError(f"{name} must be {expected}, got a {value.ndim}-D array {value.shape}; {fix}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"{name}[{i}] is {type(item).__name__} ({item!r:.40}), not a str")
    return [str(item) for item in items]  # NumPy's str_ items as plain str


def _whole_value_fix(value: object, name: str, fix: str) -> str:
    """The fix for a refused `value`; `fix` ("decode bytes first") does not fit a pandas column or a
    generator, which hold the right items in a container that is not a Sequence."""
    if hasattr(value, "tolist") and not isinstance(value, memoryview):  # a pandas Series / Index
        return f"pass {name}.tolist()"
    if isinstance(value, Iterator):  # a generator; consumed once, so list() it where it is made
        return f"pass list({name})"
    return fix


def _quote(text: str) -> str:
    """repr() of a text, shortened so a log line stays readable."""
    if len(text) <= _WARN_TEXT_CHARS:
        return repr(text)
    return repr(text[: _WARN_TEXT_CHARS - 1] + "…")


_lock = threading.Lock()
_default: Tokenizer | None = None


def get_tokenizer() -> Tokenizer:
    """The shared tokenizer over the bundled vocabulary, built on first use (~0.1 s)."""
    global _default
    if _default is None:
        with _lock:  # two threads asking at once build it once
            if _default is None:
                _default = Tokenizer()
    return _default


def tokenize(
    texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: Truncate = True
) -> IntArray:
    """Tokenize texts with the shared tokenizer; see `Tokenizer.__call__`.

    Example:
        >>> tokenize(["a diagram", "a dog"])[:, :4]
        array([[49406,   320, 22697, 49407],
               [49406,   320,  1929, 49407]])
    """
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)
