"""The dataset registry: the keys `clipengine eval` knows, their prompt sets, ImageNet's layouts, `load_dataset`.

Every reader returns a `LabelledImages` (`eval.labelled`): class names, integer labels and a way to
get image i (an in-memory (H, W, 3) uint8 array for CIFAR, a file path otherwise). The per-format
readers live in `eval.cifar` (pickles) and `eval.folders` (ImageFolder, flat folder + labels file).
Nothing is downloaded (see `eval.download`); a missing file raises DatasetError naming it and the
expected layout.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..image.files import IMAGE_EXTENSIONS  # re-exported
from .cifar import load_cifar10, load_cifar100
from .folders import find_labels_file, load_flat_folder, load_imagefolder
from .labelled import LabelledImages, read_json  # LabelledImages re-exported: the CLI imports it from here

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "LabelledImages", "load_dataset", "load_imagenet", "prompt_set"]

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "imagenet", "folder")
_PROMPT_KEYS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "imagenet": "ImageNet"}
_WNID = re.compile(r"^n\d{8}$")


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
        data = read_json(Path(path), 'a JSON object {"classes": [...], "templates": [...]}')
    source = path or "zeroshot_prompts.json"
    shape = 'a JSON object {"classes": [...], "templates": ["a photo of a {}.", ...]}'
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected {shape}, got a JSON {type(data).__name__}")
    if "templates" in data:
        entry: Any = data
    else:
        wanted = _PROMPT_KEYS.get(key.lower(), key)
        found = next((k for k in (wanted, key) if k in data), None)  # an empty {} entry is found too
        if found is None:  # "imagenet" in a user's file for --prompt-set ImageNet: the one key in any case
            folded = [k for k in data if k.lower() == key.lower()]
            found = folded[0] if len(folded) == 1 else None
        if found is None:
            raise DatasetError(f"no prompt set {key!r} in {source}; has: {', '.join(data)}")
        entry = data[found]
    if not isinstance(entry, dict) or not isinstance(entry.get("templates", []), list):
        raise DatasetError(f"{source}: prompt set {key!r} must be {shape}")
    templates = _str_items(entry.get("templates", ["a photo of a {}."]), "templates", key, source)
    if not templates:
        raise DatasetError(f"{source}: prompt set {key!r} has an empty template list")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DatasetError(f"prompt templates must contain '{{}}' for the class name: {bad[:3]}")
    classes = _str_items(entry.get("classes", []), "classes", key, source)
    blank = [i for i, c in enumerate(classes) if not c.strip()]
    if blank:  # "a photo of a ." would be a class: a stray "" in the list, not a name
        raise DatasetError(f"{source}: prompt set {key!r} has empty class names at positions {blank[:5]}")
    return classes, templates


def _str_items(value: object, field: str, key: str, source: str | Path) -> list[str]:
    """A prompt set's "classes" or "templates": a JSON list of strings, else a DatasetError.

    Not str() of whatever is there: a string would be one class per character, a dict its keys, a
    nested list its repr ("['a {}']" as a template), null a bare TypeError.
    """
    if not isinstance(value, list):
        raise DatasetError(
            f"{source}: prompt set {key!r}: {field!r} must be a JSON list of strings, got {type(value).__name__}"
        )
    wrong = [i for i, item in enumerate(value) if not isinstance(item, str)]
    if wrong:
        raise DatasetError(
            f"{source}: prompt set {key!r}: {field}[{wrong[0]}] is {value[wrong[0]]!r:.40}, not a string"
        )
    return list(value)


def load_imagenet(
    root: str | Path, split: str = "val", class_map: str | Path | None = None
) -> LabelledImages:
    """ImageNet-1k validation: `root/val/<wnid>/*.JPEG` (or `root/<wnid>/`), 1000 wnid folders whose
    sorted order is the standard class index; names from CLIP's ImageNet class list. Or a flat
    folder with a labels file (see `load_flat_folder`). `class_map`: JSON folder -> class name.
    """
    root = Path(root)
    if split != "val" and not (root / split).is_dir():
        # Only val/ may be ROOT itself (`root/<wnid>/`): a train split read from ROOT took val/ as a class.
        raise DatasetError(
            f"{root}: no {split}/ folder; ImageNet's {split!r} split is ROOT/{split}/<wnid>/*.JPEG"
        )
    base = root / split if (root / split).is_dir() else root
    mapping = read_json(Path(class_map), "JSON {folder: class name}") if class_map else None
    folders = (
        sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if base.is_dir()
        else []
    )
    if not folders or (folders == ["images"] and find_labels_file(root)):  # flat: ROOT/ or ROOT/images/
        labels_file = find_labels_file(root)
        if labels_file is None:
            raise DatasetError(
                f"no ImageNet data under {root}: expected {root}/{split}/<wnid>/*.JPEG (1000 folders n01440764..) "
                f"or a flat folder with labels.txt ('<file name> <label 0-999>' per line)"
            )
        names = _flat_class_names(Path(class_map), labels_file) if class_map else prompt_set("imagenet")[0]
        return load_flat_folder(root, labels_file, names)
    if mapping is not None:
        return load_imagefolder(base, mapping, name=f"imagenet-{split}")
    wnids = [f for f in folders if _WNID.match(f)]
    if len(wnids) != 1000 or len(folders) != 1000:
        raise DatasetError(
            f"{base} has {len(folders)} class folders ({len(wnids)} wnids); the standard class order needs "
            f"all 1000 wnid folders. Pass --class-map JSON {{folder: class name}} for a subset (a linear "
            "probe, which needs no class names, reads a subset with --dataset folder)."
        )
    return load_imagefolder(base, prompt_set("imagenet")[0], name=f"imagenet-{split}")


def _flat_class_names(class_map: Path, labels_file: Path) -> Any:
    """A flat folder's --class-map: a JSON list of class names by label index (checked as names by
    `load_flat_folder`); a {folder: name} map names no folder of that layout and is refused."""
    mapping = read_json(class_map, "a JSON list of class names by label index")
    if isinstance(mapping, dict):
        raise DatasetError(
            f"{class_map}: a flat folder with {labels_file.name} takes --class-map as a JSON list of class "
            "names by label index, not {folder: name}"
        )
    return mapping


_SPLIT_FOLDERS = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev"})


def _refuse_split_folders_as_classes(root: Path) -> None:
    """A folder dataset's test split read from ROOT itself: refused when every sub-folder is named
    like a split (train/ alone, or train/ + validation/). Those would be the classes: ROOT/train/
    alone was one class "train" that every image "hit", a top-1 of 100 %. A class that merely
    shares such a name (bus/, train/) is read."""
    folders = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
    if folders and all(name.lower() in _SPLIT_FOLDERS for name in folders):
        shown = ", ".join(f"{name}/" for name in folders)
        raise DatasetError(
            f"{root}: no test/ or val/ folder, and its sub-folders ({shown}) are split folders, not classes; "
            "the test split of a folder dataset is ROOT/test/ or ROOT/val/ (eval zeroshot also reads ROOT/NAME/ "
            "with --split NAME)"
        )


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
    if key in ("cifar10", "cifar100") and (class_map is not None or labels_file is not None):
        raise DatasetError(  # it was ignored: CIFAR's names and labels are in its pickles
            f"{dataset}: --class-map and --labels are for imagenet and folder datasets; CIFAR's class names "
            "and labels come from its own files"
        )
    if key == "cifar10":
        return load_cifar10(root, split)
    if key == "cifar100":
        return load_cifar100(root, split)
    if labels_file is not None and key in ("imagenet", "folder"):
        # A flat folder: --class-map (was ignored here) is its list of class names by label index.
        names = _flat_class_names(Path(class_map), Path(labels_file)) if class_map is not None else None
        if names is None and key == "imagenet":
            names = prompt_set("imagenet")[0]
        return load_flat_folder(root, labels_file, names)
    if key == "imagenet":
        return load_imagenet(root, "val" if split == "test" else split, class_map)
    if key == "folder":
        mapping = read_json(Path(class_map), "JSON {folder: class name}") if class_map else None
        base = Path(root)
        if split == "test":  # ROOT/test, else ROOT/val, else ROOT itself holds the class folders
            base = next((base / sub for sub in ("test", "val") if (base / sub).is_dir()), base)
            if base == Path(root):
                _refuse_split_folders_as_classes(base)
        elif (base / split).is_dir():
            base = base / split
        else:
            # Falling back to ROOT here would read the split folders (test/, ...) as classes.
            raise DatasetError(
                f"{root}: no {split}/ folder; the {split!r} split of a folder dataset is ROOT/{split}/<class>/<images>"
            )
        return load_imagefolder(base, mapping)
    raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
