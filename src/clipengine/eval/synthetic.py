"""Deterministic synthetic captioned images (coloured shapes on noisy backgrounds) and on-disk writers.

One generator feeds the tiny self-trained CLIP (`scripts/train_tiny_clip.py`), the eval tests and
any test that needs real-looking labelled images. Everything is a pure function of a seed.

Two labelings of the same images:
    task "shape"   10 classes, the shape name ("circle", ...)         -> CIFAR-10 style
    task "colour"  100 classes, "<colour> <shape>" ("red circle", ...) -> CIFAR-100 style
                   (coarse label = shape index)

Example:
    >>> ds = generate(8, seed=0, task="shape", image_size=32)
    >>> ds.images.shape  # ds.classnames[ds.labels[i]] names image i; ds.captions[i] describes it
    (8, 32, 32, 3)
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..files import atomic_path, atomic_write_bytes

__all__ = [
    "COLOURS",
    "SHAPES",
    "TASKS",
    "SyntheticDataset",
    "caption",
    "classnames",
    "generate",
    "render",
    "write_cifar10",
    "write_cifar100",
    "write_flat_folder",
    "write_imagefolder",
]

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "crescent",
    "arrow",
    "heart",
)
# Saturated, well separated RGB anchors; each sample jitters them a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (35, 70, 230),
    "yellow": (240, 225, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 190),
    "pink": (250, 120, 190),
    "cyan": (30, 220, 230),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
TASKS = ("shape", "colour")
_POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges


@dataclass(frozen=True)
class SyntheticDataset:
    """Images with labels and one caption each; row i of every field describes image i."""

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64 class index into classnames
    classnames: list[str]
    captions: list[str]  # a varied natural-language description of each image
    shapes: np.ndarray  # (N,) int64 index into SHAPES (the CIFAR-100 coarse label)
    colours: np.ndarray  # (N,) int64 index into COLOURS
    attributes: list[dict[str, str]]  # shape, colour, size, position, background: for re-captioning

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def classnames(task: str) -> list[str]:
    """Class names of a task: SHAPES for "shape", every "<colour> <shape>" for "colour"."""
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return [f"{c} {s}" for c in COLOURS for s in SHAPES]
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def pts(radii: list[float], n: int, offset: float = 0.0) -> list[tuple[float, float]]:
        out = []
        for i in range(n):
            a = rot + offset + 2 * math.pi * i / n
            rr = radii[i % len(radii)]
            out.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return out

    if shape == "square":
        return pts([r * 1.1], 4, math.pi / 4)
    if shape == "triangle":
        return pts([r * 1.15], 3, -math.pi / 2)
    if shape == "star":
        return pts([r * 1.15, r * 0.45], 10, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)]
    if shape == "cross":
        w = r * 0.36
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w)]
        base += [(-r, -w), (-w, -w)]
    elif shape == "arrow":
        base = [(-r, -0.3 * r), (0.1 * r, -0.3 * r), (0.1 * r, -0.8 * r), (r, 0), (0.1 * r, 0.8 * r)]
        base += [(0.1 * r, 0.3 * r), (-r, 0.3 * r)]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def _draw_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    """Anti-aliased coverage mask (L mode, size x size) of one shape."""
    k = _SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    d = ImageDraw.Draw(big)
    cx, cy, r = cx * k, cy * k, r * k

    def ellipse(x: float, y: float, rr: float, fill: int) -> None:
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)

    if shape == "circle":
        ellipse(cx, cy, r, 255)
    elif shape == "ring":
        ellipse(cx, cy, r, 255)
        ellipse(cx, cy, r * 0.55, 0)
    elif shape == "crescent":
        ellipse(cx, cy, r, 255)
        ellipse(cx + r * 0.5 * math.cos(rot), cy + r * 0.5 * math.sin(rot), r * 0.85, 0)
    elif shape == "heart":
        lobe = r * 0.52
        ellipse(cx - lobe * 0.9, cy - r * 0.3, lobe, 255)
        ellipse(cx + lobe * 0.9, cy - r * 0.3, lobe, 255)
        d.polygon([(cx - r * 0.98, cy - r * 0.15), (cx + r * 0.98, cy - r * 0.15), (cx, cy + r)], fill=255)
    else:
        d.polygon(_shape_polygon(shape, cx, cy, r, rot), fill=255)
    return big.resize((size, size), Image.Resampling.BOX)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Low-saturation gradient plus noise, dark or light, so it never looks like a shape colour."""
    dark = bool(rng.random() < 0.5)
    level = rng.uniform(45, 100) if dark else rng.uniform(150, 205)
    tint = rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * rng.uniform(0, 25)
    img = level + tint[None, None, :] + grad[:, :, None]
    img = img + rng.normal(0, rng.uniform(2, 12), size=(size, size, 3))
    return img.astype(np.float32), "dark" if dark else "light"


def render(
    shape: str, colour: str, rng: np.random.Generator, size: int = 32
) -> tuple[np.ndarray, dict[str, str]]:
    """Draw one image; returns ((H, W, 3) uint8, attributes used to caption it)."""
    bg, bg_name = _background(rng, size)
    big = bool(rng.random() < 0.5)
    r = size * (rng.uniform(0.27, 0.38) if big else rng.uniform(0.17, 0.25))
    pos = _POSITIONS[int(rng.integers(len(_POSITIONS)))]
    margin = r * 1.2
    lo, hi = margin, size - margin
    mid = size / 2
    spread = max(0.0, (hi - lo) / 2 * 0.35)  # how far to wander around the named position
    cx = {"left": lo, "right": hi}.get(pos.split()[-1], mid) if pos != "center" else mid
    cy = {"top": lo, "bottom": hi}.get(pos.split()[0], mid) if pos != "center" else mid
    cx = float(np.clip(cx + rng.uniform(-spread, spread), lo, hi))
    cy = float(np.clip(cy + rng.uniform(-spread, spread), lo, hi))
    rot = rng.uniform(-0.35, 0.35) if shape != "crescent" else rng.uniform(0, 2 * math.pi)
    mask = np.asarray(_draw_mask(shape, size, cx, cy, r, rot), dtype=np.float32)[:, :, None] / 255.0
    rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
    shade = rng.uniform(0.85, 1.1)
    img = bg * (1 - mask) + np.clip(rgb * shade, 0, 255)[None, None, :] * mask
    img = img + rng.normal(0, 3, size=img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    attrs = {"shape": shape, "colour": colour, "size": "big" if big else "small"}
    attrs.update(position=pos, background=bg_name)
    return np.asarray(out), attrs


_CAPTIONS = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} in the {position}",
    "a photo of a {colour} {shape}.",
    "a photo of the {size} {colour} {shape}.",
    "a picture of a {colour} {shape}",
    "the {shape} is {colour}",
    "{colour} {shape}",
    "a {shape}",
    "a photo of a {shape}.",
    "a {size} {shape}",
    "a drawing of a {shape} in the {position}",
    "an image of a {shape} on a {background} background",
    "a {shape} that is {colour}",
)


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A random caption for an image's attributes (one of several phrasings, some partial)."""
    text = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))].format(**attrs)
    return text.replace("a orange", "an orange")


def generate(n: int, *, seed: int, task: str = "shape", image_size: int = 32) -> SyntheticDataset:
    """`n` images with balanced classes (class = i mod number of classes, then shuffled).

    Deterministic: the same (n, seed, task, image_size) always gives identical bytes.
    """
    names = classnames(task)
    rng = np.random.default_rng(seed)
    colour_names = list(COLOURS)
    labels = rng.permutation(np.arange(n) % len(names))
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    shapes = np.empty(n, dtype=np.int64)
    colours = np.empty(n, dtype=np.int64)
    captions, attributes = [], []
    for i, label in enumerate(labels):
        if task == "shape":
            s, c = int(label), int(rng.integers(len(colour_names)))
        else:
            c, s = divmod(int(label), len(SHAPES))
        images[i], attrs = render(SHAPES[s], colour_names[c], rng, image_size)
        shapes[i], colours[i] = s, c
        captions.append(caption(attrs, rng))
        attributes.append(attrs)
    return SyntheticDataset(images, labels.astype(np.int64), names, captions, shapes, colours, attributes)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) uint8: row-major R plane, then G, then B (the CIFAR layout)."""
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"CIFAR images must be (N, 32, 32, 3), got {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _bnames(names: list[str] | tuple[str, ...]) -> list[bytes]:
    return [n.replace(" ", "_").encode() for n in names]  # CIFAR-100 spells "maple_tree"


def _dump(obj: object, path: Path) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=2))  # a killed run leaves no torn batch file


def _save_image(img: np.ndarray, path: Path) -> None:
    """Atomically, so a killed run leaves no truncated image that a later evaluation would count as
    an unreadable input; unsynced (`sync=False`): regenerable, and fsyncs made writing 200 images
    8x slower (2.6 s instead of 0.34 s on the test VM)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:  # the temp name's suffix would not tell Pillow either
        raise ValueError(f"unknown image extension {path.suffix!r}")
    with atomic_path(path, sync=False) as tmp:
        Image.fromarray(img).save(tmp, format=fmt)


def write_cifar10(
    root: str | Path, train: SyntheticDataset, test: SyntheticDataset, batches: int = 5
) -> Path:
    """Write `root/cifar-10-batches-py/` exactly as the official archive lays it out.

    data_batch_1..`batches` and test_batch hold {b"batch_label", b"labels", b"data", b"filenames"};
    batches.meta holds {b"num_cases_per_batch", b"label_names", b"num_vis"}. Keys and names are
    bytes: what `pickle.load(f, encoding="bytes")` returns for the real (Python 2) files. Returns the folder.
    """
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    rows = _cifar_rows(train.images)
    for b, idx in enumerate(np.array_split(np.arange(len(train)), batches), start=1):
        _dump(
            _cifar10_batch(f"training batch {b} of {batches}", rows[idx], train.labels[idx], idx),
            out / f"data_batch_{b}",
        )
    idx = np.arange(len(test))
    _dump(
        _cifar10_batch("testing batch 1 of 1", _cifar_rows(test.images), test.labels, idx), out / "test_batch"
    )
    meta = {
        b"num_cases_per_batch": math.ceil(len(train) / batches),
        b"label_names": _bnames(train.classnames),
    }
    meta[b"num_vis"] = 3072
    _dump(meta, out / "batches.meta")
    return out


def _cifar10_batch(label: str, rows: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> dict[bytes, object]:
    return {
        b"batch_label": label.encode(),
        b"labels": [int(x) for x in labels],  # a list of ints, as in the real files
        b"data": rows,
        b"filenames": [f"synthetic_{int(i):05d}.png".encode() for i in idx],
    }


def write_cifar100(root: str | Path, train: SyntheticDataset, test: SyntheticDataset) -> Path:
    """Write `root/cifar-100-python/{train,test,meta}` in the official layout.

    train/test hold {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"};
    meta holds {b"fine_label_names", b"coarse_label_names"} (bytes, as loaded from the real file).
    Coarse label = shape index. Returns the folder.
    """
    out = Path(root) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in (("train", train), ("test", test)):
        batch = {
            b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(ds))],
            b"batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1".encode(),
            b"fine_labels": [int(x) for x in ds.labels],
            b"coarse_labels": [int(x) for x in ds.shapes],
            b"data": _cifar_rows(ds.images),
        }
        _dump(batch, out / name)
    _dump(
        {b"fine_label_names": _bnames(train.classnames), b"coarse_label_names": _bnames(SHAPES)}, out / "meta"
    )
    return out


def write_imagefolder(root: str | Path, ds: SyntheticDataset, ext: str = "png") -> Path:
    """Write `root/<classname with spaces as _>/<index>.<ext>`; returns root."""
    root = Path(root)
    for i, (img, label) in enumerate(zip(ds.images, ds.labels, strict=True)):
        folder = root / ds.classnames[int(label)].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        _save_image(img, folder / f"{i:05d}.{ext}")
    return root


def write_flat_folder(root: str | Path, ds: SyntheticDataset, labels_file: str = "labels.txt") -> Path:
    """ImageNet-val style: `root/images/<name>.png` plus `root/labels.txt` ("<name> <int label>" lines)
    and `root/classnames.json` (index -> name). Returns root."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, label) in enumerate(zip(ds.images, ds.labels, strict=True)):
        name = f"SYNTH_val_{i + 1:08d}.png"
        _save_image(img, images / name)
        lines.append(f"{name} {int(label)}")
    atomic_write_bytes(root / labels_file, ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(root / "classnames.json", json.dumps(ds.classnames).encode())
    return root
