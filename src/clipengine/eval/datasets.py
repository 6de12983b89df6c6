"""Labelled image datasets read from local paths only: CIFAR pickles, ImageNet-style folders, label files.

Every reader returns a `LabelledImages`: class names, integer labels and a way to get image i
(an in-memory (H, W, 3) uint8 array for CIFAR, a file path otherwise). Nothing is downloaded here
(see `eval.download`); a missing file raises DatasetError naming it and the expected layout.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..image.files import IMAGE_EXTENSIONS, walk_images  # the first re-exported

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "LabelledImages",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_flat_folder",
    "load_imagefolder",
    "load_imagenet",
    "prompt_set",
]

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "imagenet", "folder")
_PROMPT_KEYS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "imagenet": "ImageNet"}
_CIFAR10_LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
_CIFAR100_LAYOUT = "cifar-100-python/{train, test, meta}"
_WNID = re.compile(r"^n\d{8}$")


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
        """The first n rows (for quick runs)."""
        if n >= len(self):
            return self
        arrays = None if self.arrays is None else self.arrays[:n]
        paths = None if self.paths is None else self.paths[:n]
        return LabelledImages(f"{self.name}-first{n}", self.classnames, self.labels[:n], arrays, paths)


def prompt_set(key: str, path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(classnames, templates) for a dataset key ("cifar10", "CIFAR100", "ImageNet", ...).

    Reads the bundled `eval/prompts/zeroshot_prompts.json` (CLIP's prompt sets), or a user JSON with
    the same shape: {"<key>": {"classes": [...], "templates": ["a photo of a {}.", ...]}} or
    {"classes": [...], "templates": [...]} at the top level.
    """
    if path is None:
        data = json.loads(
            (resources.files("clipengine.eval") / "prompts" / "zeroshot_prompts.json").read_text()
        )
    else:
        data = _read_json(Path(path), 'a JSON object {"classes": [...], "templates": [...]}')
    source = path or "zeroshot_prompts.json"
    shape = 'a JSON object {"classes": [...], "templates": ["a photo of a {}.", ...]}'
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected {shape}, got a JSON {type(data).__name__}")
    if "templates" in data:
        entry: Any = data
    else:
        wanted = _PROMPT_KEYS.get(key.lower(), key)
        entry = data.get(wanted) or data.get(key)
        if entry is None:
            raise DatasetError(f"no prompt set {key!r} in {source}; has: {', '.join(data)}")
    if not isinstance(entry, dict) or not isinstance(entry.get("templates", []), list):
        raise DatasetError(f"{source}: prompt set {key!r} must be {shape}")
    templates = [str(t) for t in entry.get("templates", ["a photo of a {}."])]
    if not templates:
        raise DatasetError(f"{source}: prompt set {key!r} has an empty template list")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DatasetError(f"prompt templates must contain '{{}}' for the class name: {bad[:3]}")
    return [str(c) for c in entry.get("classes", [])], templates


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path} not found; expected {expected}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); expected {expected}") from e


def _unpickle(path: Path, layout: str) -> dict[str, Any]:
    """Load a CIFAR pickle; keys come back as str whether written by Python 2 (bytes) or 3."""
    if not path.is_file():
        raise DatasetError(f"missing {path}; expected the official layout {layout}")
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path}: not a CIFAR pickle ({e}); expected the layout {layout}") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    """batch[key], or a DatasetError naming the file (e.g. a CIFAR-100 file in the CIFAR-10 layout)."""
    if key not in batch:
        raise DatasetError(f"{path}: no b'{key}' key (found {sorted(batch)}); is it from the other CIFAR?")
    return batch[key]


def _int_labels(values: Any, path: Path) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DatasetError(f"{path}: labels must be integers ({e})") from e


def _names(values: Sequence[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(batch: dict[str, Any], path: Path) -> np.ndarray:
    try:
        data = np.asarray(_field(batch, "data", path), dtype=np.uint8)
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
    names = _names(_field(_unpickle(d / "batches.meta", _CIFAR10_LAYOUT), "label_names", d / "batches.meta"))
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for f in files:
        batch = _unpickle(d / f, _CIFAR10_LAYOUT)
        images.append(_cifar_images(batch, d / f))
        labels.append(_int_labels(_field(batch, "labels", d / f), d / f))
    return _checked(f"cifar10-{split}", names, np.concatenate(labels), arrays=np.concatenate(images))


def load_cifar100(root: str | Path, split: str = "test", label: str = "fine") -> LabelledImages:
    """CIFAR-100 from `root/cifar-100-python/`; label "fine" (100 classes) or "coarse" (20)."""
    if split not in ("train", "test") or label not in ("fine", "coarse"):
        raise DatasetError(
            f"CIFAR-100 needs split train|test and label fine|coarse, got {split!r}, {label!r}"
        )
    d = _cifar_dir(root, "cifar-100-python", "meta", "cifar100", _CIFAR100_LAYOUT)
    meta = _unpickle(d / "meta", _CIFAR100_LAYOUT)
    names = _names(_field(meta, f"{label}_label_names", d / "meta"))
    batch = _unpickle(d / split, _CIFAR100_LAYOUT)
    labels = _int_labels(_field(batch, f"{label}_labels", d / split), d / split)
    suffix = "" if label == "fine" else "-coarse"
    return _checked(f"cifar100{suffix}-{split}", names, labels, arrays=_cifar_images(batch, d / split))


def _checked(
    name: str,
    classnames: list[str],
    labels: np.ndarray,
    *,
    arrays: np.ndarray | None = None,
    paths: Sequence[Path] | None = None,
) -> LabelledImages:
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


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, as `clipengine embed` lists a folder (`image.files.walk_images`):
    recursive, sorted by relative path, hidden files and folders (`._x.jpg`, `.cache/`) skipped."""
    return [path for _, path in walk_images(folder)]


def load_imagefolder(
    root: str | Path, classnames: Sequence[str] | dict[str, str] | None = None, name: str | None = None
) -> LabelledImages:
    """`root/<class>/**/<image>`: class index = sorted folder order (torchvision ImageFolder).

    Args:
        classnames: None -> folder names with "_" as spaces; a list -> names by sorted-folder index;
            a dict -> folder name -> class name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected {root}/<class name>/<image files>")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    if isinstance(classnames, dict):
        missing = [f.name for f in folders if f.name not in classnames]
        if missing:
            raise DatasetError(f"class map has no name for folders {missing[:5]} (of {len(missing)})")
        names = [classnames[f.name] for f in folders]
    elif classnames is not None:
        if len(classnames) != len(folders):
            raise DatasetError(
                f"{root} has {len(folders)} class folders but {len(classnames)} class names were given"
            )
        names = list(classnames)
    else:
        names = [f.name.replace("_", " ") for f in folders]
    paths: list[Path] = []
    labels: list[int] = []
    for i, folder in enumerate(folders):
        files = _image_files(folder)
        paths += files
        labels += [i] * len(files)
    return _checked(name or f"folder-{root.name}", names, np.asarray(labels, dtype=np.int64), paths=paths)


def load_imagenet(
    root: str | Path, split: str = "val", class_map: str | Path | None = None
) -> LabelledImages:
    """ImageNet-1k validation: `root/val/<wnid>/*.JPEG` (or `root/<wnid>/`), 1000 wnid folders whose
    sorted order is the standard class index; names from CLIP's ImageNet class list. Or a flat
    folder with a labels file (see `load_flat_folder`). `class_map`: JSON folder -> class name.
    """
    root = Path(root)
    base = root / split if (root / split).is_dir() else root
    mapping = _read_json(Path(class_map), "JSON {folder: class name}") if class_map else None
    folders = (
        sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if base.is_dir()
        else []
    )
    if not folders:
        labels_file = _find_labels_file(root)
        if labels_file is None:
            raise DatasetError(
                f"no ImageNet data under {root}: expected {root}/{split}/<wnid>/*.JPEG (1000 folders n01440764..) "
                f"or a flat folder with labels.txt ('<file name> <label 0-999>' per line)"
            )
        names = mapping if isinstance(mapping, list) else prompt_set("imagenet")[0]
        return load_flat_folder(root, labels_file, names)
    if mapping is not None:
        return load_imagefolder(base, mapping, name=f"imagenet-{split}")
    wnids = [f for f in folders if _WNID.match(f)]
    if len(wnids) != 1000 or len(folders) != 1000:
        raise DatasetError(
            f"{base} has {len(folders)} class folders ({len(wnids)} wnids); the standard class order needs "
            f"all 1000 wnid folders. Pass --class-map JSON {{folder: class name}} for a subset."
        )
    return load_imagefolder(base, prompt_set("imagenet")[0], name=f"imagenet-{split}")


def _find_labels_file(root: Path) -> Path | None:
    for name in ("labels.txt", "val.txt", "labels.json", "val_labels.txt"):
        if (root / name).is_file():
            return root / name
    return None


def load_flat_folder(
    root: str | Path, labels_file: str | Path, classnames: Sequence[str] | None = None
) -> LabelledImages:
    """Images in one folder (or `root/images/`) plus a labels file, as in ImageNet val subsets.

    Labels file formats: lines "<file name> <int label>" (Caffe `val.txt`), lines "<int label>"
    aligned with the sorted image files, or JSON {file name: int label}. Labels are 0-based indices
    into `classnames` (default: a `classnames.json` list beside the file). Note: the devkit's
    `ILSVRC2012_validation_ground_truth.txt` uses 1-based ILSVRC ids, not the standard sorted-wnid
    order; convert it first.
    """
    root, labels_path = Path(root), Path(labels_file)
    if not labels_path.is_absolute() and not labels_path.exists():
        labels_path = root / labels_path
    if not labels_path.is_file():
        raise DatasetError(f"labels file {labels_path} not found; expected lines '<file name> <label>'")
    if classnames is None:
        classnames = _read_json(labels_path.parent / "classnames.json", "a JSON list of class names")
    image_dir = root / "images" if (root / "images").is_dir() else root
    files = {p.name: p for p in _image_files(image_dir)}
    entries = _parse_labels(labels_path, sorted(files))
    missing = [n for n, _ in entries if n not in files]
    if missing:
        raise DatasetError(f"{labels_path} names {len(missing)} files not in {image_dir}, e.g. {missing[0]}")
    paths = [files[n] for n, _ in entries]
    labels = np.asarray([lab for _, lab in entries], dtype=np.int64)
    return _checked(f"flat-{root.name}", list(classnames), labels, paths=paths)


def _parse_labels(path: Path, sorted_names: list[str]) -> list[tuple[str, int]]:
    try:
        if path.suffix == ".json":
            data = _read_json(path, "JSON {file name: int label}")
            if not isinstance(data, dict):
                raise DatasetError(
                    f"{path}: expected JSON {{file name: int label}}, got a {type(data).__name__}"
                )
            return [(Path(k).name, int(v)) for k, v in sorted(data.items())]
        text = path.read_text(encoding="utf-8")
        lines = [ln.split() for ln in text.splitlines() if ln.strip()]
        if all(len(p) == 1 for p in lines):
            if len(lines) != len(sorted_names):
                raise DatasetError(f"{path}: {len(lines)} labels but {len(sorted_names)} images")
            return [(n, int(p[0])) for n, p in zip(sorted_names, lines, strict=True)]
        names = set(sorted_names)
        entries = []
        for ln in text.splitlines():
            if ln.strip():
                head, label = ln.strip().rsplit(None, 1)
                name = Path(head).name  # a file name with spaces: everything before the label
                entries.append((name if name in names else Path(head.split()[0]).name, int(label)))
        return entries
    except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"{path}: expected '<file name> <int label>' or '<int label>' lines ({e})") from e


def load_dataset(
    dataset: str,
    root: str | Path,
    split: str = "test",
    *,
    class_map: str | Path | None = None,
    labels_file: str | Path | None = None,
) -> LabelledImages:
    """Dispatch on a dataset key: cifar10 | cifar100 | imagenet | folder (any ImageFolder)."""
    key = dataset.lower()
    if key == "cifar10":
        return load_cifar10(root, split)
    if key == "cifar100":
        return load_cifar100(root, split)
    if key == "imagenet":
        if labels_file is not None:
            return load_flat_folder(root, labels_file, prompt_set("imagenet")[0])
        return load_imagenet(root, "val" if split == "test" else split, class_map)
    if key == "folder":
        if labels_file is not None:
            return load_flat_folder(root, labels_file)
        mapping = _read_json(Path(class_map), "JSON {folder: class name}") if class_map else None
        base = Path(root)
        if split == "test":  # ROOT/test, else ROOT/val, else ROOT itself holds the class folders
            base = next((base / sub for sub in ("test", "val") if (base / sub).is_dir()), base)
        elif (base / split).is_dir():
            base = base / split
        else:
            # Falling back to ROOT here would read the split folders (test/, ...) as classes.
            raise DatasetError(
                f"{root}: no {split}/ folder; the {split!r} split of a folder dataset is ROOT/{split}/<class>/<images>"
            )
        return load_imagefolder(base, mapping)
    raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
