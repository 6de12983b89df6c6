"""CIFAR-10 / CIFAR-100 readers over the official Python pickles (`cifar-10-batches-py/`, `cifar-100-python/`).

Separate from the folder readers (`eval.folders`): the images come from pickled arrays held in
memory, and the checks here are about pickle keys and pixel shapes, not files on disk.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .labelled import LabelledImages, checked

__all__ = ["load_cifar10", "load_cifar100"]

_CIFAR10_LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
_CIFAR100_LAYOUT = "cifar-100-python/{train, test, meta}"


# The only callables a CIFAR pickle names: NumPy's array reconstruction (numpy.core before NumPy 2,
# numpy._core after; _frombuffer at protocol 5), the codec Python 3 pickles bytes with at protocol 2,
# and the constructors of b"", set and frozenset. Anything else (os.system, builtins.eval, ...) is
# refused before it is looked up, so reading a dataset never runs its code.
_CIFAR_GLOBALS = frozenset(
    {
        *(
            (f"numpy.{core}.multiarray", name)
            for core in ("core", "_core")
            for name in ("_reconstruct", "scalar")
        ),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        *((module, name) for module in ("builtins", "__builtin__") for name in ("bytes", "set", "frozenset")),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_CIFAR_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR pickle never does")
        return super().find_class(module, name)


def _unpickle(path: Path, layout: str) -> dict[str, Any]:
    """Load a CIFAR pickle; keys come back as str whether written by Python 2 (bytes) or 3.

    Only NumPy arrays and plain containers are rebuilt (`_CifarUnpickler`): a pickle naming any
    other callable is refused, never run.
    """
    if not path.is_file():
        raise DatasetError(f"missing {path}; expected the official layout {layout}")
    try:
        with path.open("rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except MemoryError as e:  # a corrupt length field asks for a huge allocation
        raise DatasetError(
            f"{path}: not a CIFAR pickle (a corrupt size field); expected the layout {layout}"
        ) from e
    except Exception as e:  # a corrupt pickle fails in many ways: KeyError, TypeError, LookupError, ...
        raise DatasetError(
            f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); expected the layout {layout}"
        ) from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    """batch[key], or a DatasetError naming the file (e.g. a CIFAR-100 file in the CIFAR-10 layout)."""
    if key not in batch:
        raise DatasetError(f"{path}: no b'{key}' key (found {sorted(batch)}); is it from the other CIFAR?")
    return batch[key]


def _int_labels(values: Any, path: Path) -> np.ndarray:
    """A list of int labels as int64; a float (1.5 was read as 1), a str or a nested list is refused."""
    try:
        labels = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as e:  # ragged nesting
        raise DatasetError(f"{path}: labels must be a list of integers ({e})") from e
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"{path}: labels must be a list of integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _names(values: Any, path: Path) -> list[str]:
    """Class names: a list of non-empty bytes (UTF-8, as the official files hold) or str."""
    if not isinstance(values, list | tuple):
        raise DatasetError(f"{path}: class names must be a list, got {type(values).__name__}")
    names = []
    for i, v in enumerate(values):
        try:
            name = v.decode("utf-8") if isinstance(v, bytes) else v
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: class name {i} ({v!r:.40}) is not UTF-8 ({e})") from e
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: class name {i} is {v!r:.40}; expected a non-empty string")
        names.append(name)
    return names


def _cifar_images(batch: dict[str, Any], path: Path) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from b'data'. Pixels held as another dtype are taken only when they are
    integers in [0, 255]: casting wrapped 300 to 44 and truncated 0-1 floats to black images."""
    try:
        raw = np.asarray(_field(batch, "data", path))
        exact = raw.dtype == np.uint8 or (
            raw.dtype.kind in "iuf" and bool(np.all((raw >= 0) & (raw <= 255) & (raw == np.round(raw))))
        )
        if not exact:
            raise ValueError(f"{raw.dtype} values that are not all integers in [0, 255]")
        data = raw.astype(np.uint8)
    except (TypeError, ValueError, OverflowError) as e:
        raise DatasetError(f"{path}: b'data' must be (N, 3072) uint8 pixel values ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: b'data' must be (N, 3072) uint8, got {data.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)


def _cifar_dir(root: str | Path, folder: str, meta: str, key: str, layout: str) -> Path:
    """`root/folder` (or root itself when it is that folder), recognised by its meta file."""
    root = Path(root)
    for cand in (root / folder, root):
        if (cand / meta).is_file():
            return cand
    raise DatasetError(
        f"no CIFAR data under {root}: expected {root / folder} with {layout} "
        f"(fetch it with `clipengine download-data {key} --root {root}`)"
    )


def load_cifar10(root: str | Path, split: str = "test") -> LabelledImages:
    """CIFAR-10 from `root/cifar-10-batches-py/` (or that folder itself); split "train" or "test"."""
    if split not in ("train", "test"):
        raise DatasetError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    d = _cifar_dir(root, "cifar-10-batches-py", "batches.meta", "cifar10", _CIFAR10_LAYOUT)
    meta = d / "batches.meta"
    names = _names(_field(_unpickle(meta, _CIFAR10_LAYOUT), "label_names", meta), meta)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for f in files:
        batch = _unpickle(d / f, _CIFAR10_LAYOUT)
        images.append(_cifar_images(batch, d / f))
        labels.append(_int_labels(_field(batch, "labels", d / f), d / f))
    return checked(f"cifar10-{split}", names, np.concatenate(labels), arrays=np.concatenate(images))


def load_cifar100(root: str | Path, split: str = "test", label: str = "fine") -> LabelledImages:
    """CIFAR-100 from `root/cifar-100-python/`; label "fine" (100 classes) or "coarse" (20)."""
    if split not in ("train", "test") or label not in ("fine", "coarse"):
        raise DatasetError(
            f"CIFAR-100 needs split train|test and label fine|coarse, got {split!r}, {label!r}"
        )
    d = _cifar_dir(root, "cifar-100-python", "meta", "cifar100", _CIFAR100_LAYOUT)
    meta = _unpickle(d / "meta", _CIFAR100_LAYOUT)
    names = _names(_field(meta, f"{label}_label_names", d / "meta"), d / "meta")
    batch = _unpickle(d / split, _CIFAR100_LAYOUT)
    labels = _int_labels(_field(batch, f"{label}_labels", d / split), d / split)
    suffix = "" if label == "fine" else "-coarse"
    return checked(f"cifar100{suffix}-{split}", names, labels, arrays=_cifar_images(batch, d / split))
