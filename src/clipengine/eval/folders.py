"""Readers of labelled image folders: ImageFolder (`root/<class>/<images>`) and one flat folder plus a labels file.

Separate from the CIFAR pickles (`eval.cifar`) and the registry (`eval.datasets`, which also reads
ImageNet's layouts through these two); images are listed as `clipengine embed` lists a folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..image.files import walk_images
from .labelled import LabelledImages, checked, class_names, read_json, read_utf8

__all__ = ["find_labels_file", "load_flat_folder", "load_imagefolder"]

log = logging.getLogger(__name__)


def _image_files(folder: Path, within: Path | None = None) -> list[Path]:
    """Image files under `folder`, as `clipengine embed` lists a folder (`image.files.walk_images`):
    recursive, sorted by relative path, hidden files and folders (`._x.jpg`, `.cache/`) skipped.
    `within`: the dataset folder, for a class folder (a link to another class's folder is skipped)."""
    return [path for _, path in walk_images(folder, within=within)]


def _folder_name(root: Path) -> str:
    """The name of the folder `root` is, for the dataset's name (and so its report files): "." and
    ".." have none of their own (Path(".").name is ""), so every `--root .` was "folder-"."""
    return root.name if root.name not in ("", "..") else root.resolve().name


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
    if classnames is not None:
        classnames = class_names(classnames, "class map")
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
    empty = []
    for i, folder in enumerate(folders):
        files = _image_files(folder, within=root)
        paths += files
        labels += [i] * len(files)
        if not files:
            empty.append(folder.name)
    if empty and paths:  # torchvision's ImageFolder refuses these; here they stay classes, said once
        log.warning(
            "%s: %d of %d class folders hold no images (%s): they stay candidate classes, so every image "
            "is also scored against them, but have no recall of their own",
            root, len(empty), len(folders), ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )  # fmt: skip
    return checked(
        name or f"folder-{_folder_name(root)}", names, np.asarray(labels, dtype=np.int64), paths=paths
    )


def find_labels_file(root: Path) -> Path | None:
    """The first labels file `load_flat_folder` reads that `root` holds, if any."""
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
    source: object = "class names"
    if classnames is None:
        source = labels_path.parent / "classnames.json"
        classnames = read_json(source, "a JSON list of class names")
    names = class_names(classnames, source)
    if isinstance(names, dict):  # labels are indices: names by index, not by folder
        raise DatasetError(f"{source}: expected a list of class names (labels index it), got an object")
    image_dir = root / "images" if (root / "images").is_dir() else root
    files = {p.name: p for p in _image_files(image_dir)}
    entries = _parse_labels(labels_path, sorted(files))
    seen: dict[str, int] = {}
    for n, _ in entries:
        seen[n] = seen.get(n, 0) + 1
    twice = [n for n, count in seen.items() if count > 1]
    if twice:  # else the image is scored once per entry, under each of its labels
        raise DatasetError(
            f"{labels_path} lists {len(twice)} image(s) more than once, e.g. {twice[0]} ({seen[twice[0]]} times)"
        )
    missing = [n for n, _ in entries if n not in files]
    if missing:
        raise DatasetError(f"{labels_path} names {len(missing)} files not in {image_dir}, e.g. {missing[0]}")
    paths = [files[n] for n, _ in entries]
    labels = np.asarray([lab for _, lab in entries], dtype=np.int64)
    return checked(f"flat-{_folder_name(root)}", names, labels, paths=paths)


def _parse_labels(path: Path, sorted_names: list[str]) -> list[tuple[str, int]]:
    try:
        if path.suffix == ".json":
            data = read_json(path, "JSON {file name: int label}")
            if not isinstance(data, dict):
                raise DatasetError(
                    f"{path}: expected JSON {{file name: int label}}, got a {type(data).__name__}"
                )
            return [(Path(k).name, _json_label(v)) for k, v in sorted(data.items())]
        text = read_utf8(path)  # a BOM would start the first file name
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
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: expected '<file name> <int label>' or '<int label>' lines ({e})") from e


def _json_label(value: object) -> int:
    """A label of a JSON labels file: an integer (3.0 too, as pandas writes it, or "3", as text lines
    hold it). int() alone read 1.5 and true as label 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"label {value!r} is not an integer")
    return int(value)
