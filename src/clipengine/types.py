"""Plain data passed between stages, and the Backend protocol every runtime implements."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Backend",
    "Batch",
    "Embeddings",
    "Failure",
    "FloatArray",
    "ImageInput",
    "ImageItem",
    "IntArray",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
# What the public API accepts as "an image": a path, encoded bytes, a PIL image or an HxWxC / HxW array.
# As `image.decode.open_image` takes them: any os.PathLike (a Path, an os.DirEntry) and bytes-like
# buffers, so a script passing a bytearray type-checks as it runs.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image", npt.NDArray[Any]]


@dataclass(frozen=True)
class ImageItem:
    """One image to embed: a stable id (usually the relative path) and where its bytes come from."""

    id: str
    source: str | Path | bytes  # a file path, or the encoded bytes themselves


@dataclass(frozen=True)
class Failure:
    """An input that could not be used, and why (never silently dropped)."""

    id: str
    reason: str


@dataclass(frozen=True)
class Batch:
    """Preprocessed images ready for a backend; ids align with rows of pixels."""

    ids: list[str]
    pixels: FloatArray  # (N, 3, H, W) float32, normalised
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height) per row
    failures: list[Failure] = field(default_factory=list)  # items of this batch that failed to decode


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised embeddings; row i belongs to ids[i]."""

    ids: list[str]
    vectors: FloatArray  # (N, D) float32, unit L2 norm


@runtime_checkable
class Backend(Protocol):
    """A runtime that turns preprocessed pixels and token ids into L2-normalised embeddings.

    Backends know nothing of files, decoding or tokenization: arrays in, arrays out.
    """

    name: str  # "torch" | "onnx" | test fakes
    device: str  # "cpu", "cuda", "cuda:1"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8"
    embed_dim: int  # D
    image_size: int  # H == W the image tower expects
    context_length: int  # L the text tower expects

    def encode_images(self, pixels: FloatArray, *, normalize: bool = True) -> FloatArray:
        """(N, 3, H, W) float32 -> (N, D) float32, unit L2 norm (`normalize=False`: the tower's
        output as it is, for a linear probe fitted as CLIP's README fits it)."""
        ...

    def encode_texts(self, tokens: IntArray) -> FloatArray:
        """(N, L) int64 token ids -> (N, D) float32, unit L2 norm."""
        ...
