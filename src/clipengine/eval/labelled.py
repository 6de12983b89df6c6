"""What every dataset reader returns (`LabelledImages`) and the checks they share.

Separate from the readers (`eval.cifar`, `eval.folders`, ImageNet in `eval.datasets`) so each imports
the type without importing the others, and from `eval.datasets`, the registry that dispatches to them.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

__all__ = ["LabelledImages", "checked", "class_names", "read_json", "read_utf8"]


@dataclass(frozen=True)
class LabelledImages:
    """A classification split. Row i: image `image(i)`, label `labels[i]` (index into classnames)."""

    name: str  # e.g. "cifar10-test"; part of feature-cache keys
    classnames: list[str]
    labels: np.ndarray  # (N,) int64
    arrays: np.ndarray | None = None  # (N, H, W, 3) uint8 when held in memory (CIFAR)
    paths: tuple[Path, ...] | None = None  # image files otherwise

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, i: int) -> np.ndarray | Path:
        """Image i as something `clipengine.image.preprocess.preprocess` accepts."""
        if self.arrays is not None:
            return np.asarray(self.arrays[i])
        if self.paths is None:
            raise DatasetError(f"{self.name}: neither arrays nor paths are set")
        return self.paths[i]

    def images(self, start: int = 0, stop: int | None = None) -> list[np.ndarray | Path]:
        """Images [start, stop) as a list (arrays or paths)."""
        return [self.image(i) for i in range(start, len(self) if stop is None else min(stop, len(self)))]

    def subset(self, n: int) -> LabelledImages:
        """n rows spread evenly over the split, in order (for quick runs).

        Not the first n: folders and ImageNet list their images class by class, so the first 500 of
        ImageNet's val were 10 of its 1000 classes, and a linear probe's first n train images often
        one class. Every k-th row (k = len / n) keeps the split's class mix.
        """
        if n >= len(self):
            return self
        rows = (np.arange(n) * len(self)) // n  # strictly increasing for n < len
        arrays = None if self.arrays is None else self.arrays[rows]
        paths = None if self.paths is None else tuple(self.paths[i] for i in rows)
        name = f"{self.name}-{n}of{len(self)}"
        return LabelledImages(name, self.classnames, self.labels[rows], arrays, paths)


def checked(
    name: str,
    classnames: list[str],
    labels: np.ndarray,
    *,
    arrays: np.ndarray | None = None,
    paths: Sequence[Path] | None = None,
) -> LabelledImages:
    """A LabelledImages after checking one label per image, labels in range and at least one image."""
    n = len(arrays) if arrays is not None else len(paths or ())
    if labels.shape != (n,):
        raise DatasetError(f"{name}: {n} images but {labels.shape[0]} labels")
    if n and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise DatasetError(
            f"{name}: labels must be in [0, {len(classnames)}), got [{labels.min()}, {labels.max()}]"
        )
    if n == 0:
        raise DatasetError(f"{name}: no images found")
    return LabelledImages(name, classnames, labels, arrays, tuple(paths) if paths is not None else None)


def read_json(path: Path, expected: str) -> Any:
    """The JSON in `path`, or a DatasetError naming the file and what was `expected`."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; expected {expected}")
    text = read_utf8(path)  # JSON is UTF-8 (RFC 8259)
    try:
        return json.loads(text)
    except ValueError as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); expected {expected}") from e


def read_utf8(path: Path) -> str:
    """The text of `path`, decoded strictly as UTF-8 (a leading BOM, as Notepad writes, dropped).

    Raises:
        DatasetError: the file cannot be read, or is not UTF-8: a class list saved as Latin-1 /
            cp1252 ("café" as the byte 0xE9) is named with the line and byte offset at fault, not
            read with replacement characters the text model would embed instead of the names.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read it ({e.strerror or e})") from e
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise DatasetError(
            f"{path}: line {line}: byte 0x{data[at]:02X} at offset {at} is not UTF-8 ({e.reason}); "
            "the file is in another encoding (Latin-1 / cp1252?): save it as UTF-8"
        ) from e


def class_names(value: object, source: object) -> list[str] | dict[str, str]:
    """Class names as given (a list by class index, or a dict folder -> name), each a non-empty str.

    A JSON string would otherwise be one class per character, null a bare AttributeError later, and
    "" an empty class scored as "a photo of a ."; `source` names the file or argument in the error.
    """
    if isinstance(value, dict):
        items = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        raise DatasetError(
            f"{source}: class names must be a list of names or a {{folder: name}} object, got {type(value).__name__}"
        )
    for where, name in items:
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{source}: class name {where} is {name!r:.40}; expected a non-empty string")
    return dict(value) if isinstance(value, dict) else list(value)
