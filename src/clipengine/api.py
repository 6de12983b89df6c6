"""Public API: `load()` a model by name, checkpoint, HF folder or export folder into a `ClipModel`."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from PIL import Image

from .arguments import positive_int
from .errors import BackendError, InputError
from .extras import install_hint
from .image.preprocess import PreprocessConfig, preprocess
from .text.tokenizer import as_str_list, tokenize
from .types import Backend, FloatArray, ImageInput
from .zeroshot import check_top_k, check_utf8_texts, class_embeddings, rank_labels

if TYPE_CHECKING:
    from .backends.folder import ExportFolderBackend

__all__ = ["ClipModel", "load", "load_export"]

_log = logging.getLogger(__name__)

_EXPORT_MANIFEST = "manifest.json"
# What a list of texts (texts, labels, templates) may be: a 1-D array of str too, e.g. a DataFrame
# column's .to_numpy() (`text.tokenizer.as_str_list`).
_Texts = Sequence[str] | npt.NDArray[Any]
# What one image may be (see `image.decode.decode_image`).
_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)
# A 4-D array is read as preprocessed pixels; a stack of raw frames (video, a dataset) is one too,
# and the refusal must say how to pass those instead.
_RAW_STACK_FIX = (
    "to encode raw pixels, pass list(images) for (N, H, W, 3) arrays, "
    "or list(images.transpose(0, 2, 3, 1)) for (N, 3, H, W)"
)


class ClipModel:
    """A CLIP model behind any Backend: preprocess, encode, classify. Embeddings are unit-norm (N, D).

    Example (needs the ViT-B-32 weights in the cache and a cat.jpg, hence not run by doctest):
        >>> model = clipengine.load("ViT-B-32")  # doctest: +SKIP
        >>> model.classify("cat.jpg", ["a cat", "a dog"])  # doctest: +SKIP
        [[('a cat', 0.98), ('a dog', 0.02)]]
    """

    def __init__(
        self,
        backend: Backend,
        preprocess_cfg: PreprocessConfig,
        name: str,
        logit_scale: float,
        context_length: int = 77,
    ) -> None:
        # Checked here: a bad value was an AttributeError ('image_size') or float()'s ValueError, or
        # (inf, NaN) made every classify() probability NaN.
        if not isinstance(preprocess_cfg, PreprocessConfig):
            kind = type(preprocess_cfg).__name__
            raise InputError(f"preprocess_cfg must be a PreprocessConfig, got {kind}")
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float | np.number):
            raise InputError(f"logit_scale must be a finite number, got {logit_scale!r}")
        if not np.isfinite(logit_scale):
            raise InputError(f"logit_scale must be a finite number, got {logit_scale!r}")
        if preprocess_cfg.image_size != backend.image_size:
            raise BackendError(
                f"preprocessing makes {preprocess_cfg.image_size} px images but the backend expects "
                f"{backend.image_size} px"
            )
        self._backend = backend
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.logit_scale = float(logit_scale)  # exp()'d temperature, 100 for released CLIPs
        self.context_length = context_length

    def __repr__(self) -> str:
        b = self._backend
        return f"ClipModel({self.name!r}, backend={b.name}, device={b.device}, precision={b.precision})"

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def embed_dim(self) -> int:
        return self._backend.embed_dim

    @property
    def image_size(self) -> int:
        return self._backend.image_size

    def preprocess(self, image: ImageInput) -> FloatArray:
        """Decode and preprocess one image -> (3, H, W) float32.

        Raises:
            DecodeError: the image cannot be decoded (the message names it).
            InputError: `image` is not a path, bytes, PIL image or array (as in `encode_images`).
        """
        (item,) = _image_items(image, several=False)  # else the decoder's bare TypeError
        return preprocess(item, self.preprocess_cfg)

    def _checked_pixels(self, pixels: np.ndarray) -> FloatArray:
        expected = (3, self.image_size, self.image_size)
        if pixels.shape[1:] != expected:
            raise InputError(
                f"preprocessed images must be (N, 3, {self.image_size}, {self.image_size}); got {pixels.shape}; "
                f"{_RAW_STACK_FIX}"
            )
        if not np.issubdtype(pixels.dtype, np.floating):  # uint8 would run un-normalised, silently wrong
            raise InputError(
                f"preprocessed images must be float (normalised by model.preprocess); got {pixels.dtype}; "
                f"{_RAW_STACK_FIX}"
            )
        out = np.asarray(pixels, dtype=np.float32)
        if not np.isfinite(out).all():
            raise InputError("preprocessed images contain NaN or infinite values")
        return out

    def encode_images(
        self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32, *, normalize: bool = True
    ) -> FloatArray:
        """Images -> (N, D) float32 unit-norm embeddings, `batch_size` at a time (`normalize=False`:
        the image tower's output as it is, e.g. for a linear probe as CLIP's README fits one).

        Accepts one image (path, bytes, PIL image, (H, W[, C]) array), a list of them (decoded and
        preprocessed one batch at a time), or an already preprocessed (N, 3, H, W) float32 array.

        Raises:
            DecodeError: an image cannot be decoded (the message names it).
            InputError: `images` (or an item of the list) is none of the kinds above or an empty path, or a
                preprocessed batch is not float (N, 3, S, S) with finite values; `batch_size` is not an integer >= 1.
        """
        batch_size = _batch_size(batch_size)
        if not isinstance(normalize, bool | np.bool_):  # "no" would be truthy: unit rows, silently
            raise InputError(f"normalize must be True or False, got {normalize!r}")
        encode = self._backend.encode_images  # the keyword only when asked: older backends lack it
        if not normalize:
            encode = functools.partial(encode, normalize=False)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self._in_batches(encode, self._checked_pixels(images), batch_size)
        items = _image_items(images)
        outs = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for start in range(0, len(items), batch_size):
            pixels = np.stack([self.preprocess(item) for item in items[start : start + batch_size]])
            outs.append(encode(pixels))
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)

    def encode_texts(self, texts: str | _Texts, batch_size: int = 256) -> FloatArray:
        """Texts -> (N, D) float32 unit-norm embeddings (long texts are cut with a warning).

        Raises:
            InputError: `texts` is not a str or a list (tuple, 1-D array) of str (checked by the tokenizer); `batch_size` is not an integer >= 1;
                a text holds bytes that were not UTF-8 (a lone surrogate: "caf\\udce9").
        """
        batch_size = _batch_size(batch_size)
        # cast: tokenize takes a 1-D array of str too (`as_str_list`), though typed for lists
        tokens = tokenize(cast("str | Sequence[str]", texts), context_length=self.context_length)
        # After tokenize has checked the types: bytes that were not UTF-8 (a Latin-1 file name or
        # argument) would reach the model as U+FFFD without a word, as the CLI and server refuse them.
        check_utf8_texts([texts] if isinstance(texts, str) else list(texts), "texts")
        return self._in_batches(self._backend.encode_texts, tokens, batch_size)

    def _in_batches(self, fn: Any, inputs: np.ndarray, batch_size: int) -> FloatArray:
        if inputs.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        outs = [fn(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)

    def text_classifier(self, labels: _Texts, templates: _Texts | None = None) -> FloatArray:
        """(C, D) unit-norm class embeddings; with templates, the renormalised mean over prompts.

        Templates use "{}" for the label (e.g. "a photo of a {}.").

        Raises:
            InputError: `labels` (or `templates`) is not a list of str (one str, a dict, a number,
                an item that is not a str), `labels` is empty, or a template has no "{}".
        """
        return class_embeddings(self.encode_texts, *_classifier_args(labels, templates))

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: _Texts,
        templates: _Texts | None = None,
        top_k: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Zero-shot: per image, (label, probability) sorted by probability, highest first.

        probs = softmax(logit_scale * cosine(image, label)), over all labels; `top_k` keeps only the
        `top_k` most probable per image (None: all; `zeroshot.rank_labels`).

        Raises:
            InputError: bad `images`, `labels`, `templates` (see `encode_images`, `text_classifier`)
                or `top_k` (not None or an integer >= 1; checked before anything is encoded).
        """
        label_list, template_list = _classifier_args(labels, templates)
        if top_k is not None:
            check_top_k(top_k)
        classifier = class_embeddings(self.encode_texts, label_list, template_list)
        return rank_labels(self.encode_images(images), classifier, self.logit_scale, label_list, top_k)


def _batch_size(value: object) -> int:
    return positive_int(value, "batch_size")


def _classifier_args(labels: object, templates: object) -> tuple[list[str], list[str] | None]:
    """`labels` and `templates` as lists of str, checked before anything is encoded."""
    if isinstance(labels, str):  # a str is a Sequence: "cat" would be the labels "c", "a", "t"
        raise InputError(f"labels must be a list of labels, not one string ({labels!r})")
    label_list = _str_list(labels, "labels")
    if not label_list:
        raise InputError("classify needs at least one label")
    if templates is None:
        return label_list, None
    if isinstance(templates, str):
        raise InputError(f"templates must be a list of templates, not one string ({templates!r})")
    template_list = _str_list(templates, "templates")
    if not template_list:  # not silently the bare labels: that is templates=None
        raise InputError("templates is empty; pass templates=None to embed the bare labels")
    bad = [t for t in template_list if "{}" not in t]
    if bad:  # every label would get the same prompt: uniform, meaningless probabilities
        raise InputError(f"templates need '{{}}' where the label goes: {bad[:3]}")
    return label_list, template_list


def _str_list(value: object, name: str) -> list[str]:
    """`labels` / `templates` as a list of str (see `as_str_list`); a set is refused, having no
    order to rank labels by."""
    return as_str_list(value, name, f"a list of {name}", "pass a list of str (for a dict, list(d) or list(d.values()))")


def _image_items(images: object, *, several: bool = True) -> list[ImageInput]:
    """One image or a list/tuple of images as a list, every item checked before any is decoded.

    The decoder would raise a bare TypeError only when it reaches a bad item, after decoding and
    encoding the batches before it. `several=False`: exactly one image (`ClipModel.preprocess`).
    """
    # A single str/bytes is a Sequence too: only lists and tuples mean "several images".
    many = several and isinstance(images, (list, tuple))
    items = list(cast(Sequence[object], images)) if many else [images]
    for i, item in enumerate(items):
        where = f"images[{i}]" if many else ("images" if several else "image")
        if not isinstance(item, _IMAGE_TYPES):
            expected = "or a list of them" if several else "one image"
            raise InputError(
                f"{where} is {type(item).__name__}; expected a path, bytes, PIL image or array, {expected}"
                f"{_refused_image_fix(item, where, several)}"
            )
        if isinstance(item, str) and not item:  # Path("") is the working folder: "is a directory"
            raise InputError(f"{where} is an empty path ('')")
    return cast(list[ImageInput], items)


def _refused_image_fix(item: object, where: str, several: bool) -> str:
    """How to pass a refused `item` that holds images in a form users reach for first ("" if none);
    `several`: a list is taken (not by `ClipModel.preprocess`)."""
    if hasattr(item, "read"):  # Image.open takes file objects, and so users expect encode_images to
        return "; pass its bytes (.getvalue(), or .read() of a file)"
    if several and isinstance(item, Iterator):  # a generator (after files: those iterate too, by lines)
        return f"; pass list({where})"
    if type(item).__module__.split(".")[0] == "torch":  # torchvision's ToTensor gives (3, H, W) floats
        return "; pass a NumPy array: t.permute(1, 2, 0).numpy() of a (3, H, W) uint8 or [0, 1] float tensor"
    return ""


def _check_option(value: object, name: str, kind: type, expected: str) -> None:
    """A `load` option of the wrong type is an InputError naming it, not an AttributeError or
    TypeError from deep inside a backend or the registry (`device=None`: "'NoneType' object has no
    attribute 'startswith'")."""
    if not isinstance(value, kind):
        raise InputError(f"{name} must be {expected}, got {value!r}")


def load(
    name_or_path: str | Path,
    *,
    pretrained: str | None = None,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    allow_download: bool = False,
    **opts: Any,
) -> ClipModel:
    """Load a CLIP model ready for inference.

    Args:
        name_or_path: model name ("ViT-B-32", "ViT-B-32@laion2b_s34b_b79k", "hf-hub:org/name"),
            checkpoint file, transformers/open_clip/clipengine folder, or an ONNX export folder
            (one with manifest.json).
        pretrained: tag, alternative to "NAME@TAG".
        backend: "torch" (checkpoints), or "onnx" / "openvino" (export folders; an export folder
            with backend "torch" runs on "onnx").
        device: "cpu", "cuda", "cuda:N".
        precision: "fp32", "bf16", "fp16" (CUDA only), "fp8" (FP8 GPUs) for torch; what the export
            holds for onnx and openvino ("fp32", "fp16", "int8", "int8w"; openvino also "bf16", on
            the fp32 engines).
        allow_download: fetch missing registered weights (never otherwise).
        **opts: passed to the backend (or `arch=` to the checkpoint loader).

    Raises:
        UnknownModelError, CheckpointError, DownloadNotAllowedError, DownloadError, BackendError
        (InputError, a BackendError, for a `name_or_path` that is not a str or Path or is the
        manifest or an engine of an export folder rather than the folder, a backend that
        cannot run it, bad options, an empty `pretrained`, or an option of the wrong type: `device`,
        `precision`, `pretrained` not a str, `allow_download` not a bool).
    """
    from .backends import BACKEND_KINDS

    if not isinstance(name_or_path, str | os.PathLike):  # else pathlib's bare TypeError
        raise InputError(
            f"name_or_path must be a model name or a path (str or Path), got {type(name_or_path).__name__}; "
            "e.g. clipengine.load('ViT-B-32') or clipengine.load(Path('models/ViT-B-32'))"
        )
    if backend not in BACKEND_KINDS:  # else named below as a backend that needs an export folder
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_KINDS)}")
    if pretrained is not None:
        _check_option(pretrained, "pretrained", str, "a weights tag (str) or None")
        if not pretrained.strip():  # as "NAME@" is refused: not silently the default weights
            raise InputError("pretrained is empty; pass a tag, e.g. pretrained='openai', or leave it out")
    _check_option(allow_download, "allow_download", bool, "True or False")  # "no" would download
    _check_option(device, "device", str, "a device name (str), e.g. 'cpu' or 'cuda'")
    _check_option(precision, "precision", str, "a precision name (str), e.g. 'fp32' or 'bf16'")
    path = Path(name_or_path).expanduser()
    _refuse_export_file(path)
    from .export.manifest import unfinished_export  # torch-free

    # A folder an interrupted export left: read_manifest says so (as a model folder: "no config.json").
    if path.is_dir() and ((path / _EXPORT_MANIFEST).is_file() or unfinished_export(path)):
        if pretrained is not None:
            _check_export_tag(path, pretrained)
        if backend != "torch":  # "torch" or "onnx" on an export folder: ONNX Runtime
            opts["backend"] = backend
        return load_export(path, device=device, precision=precision, **opts)
    if backend != "torch":
        raise InputError(
            f"backend {backend!r} runs export folders (with {_EXPORT_MANIFEST}); "
            f"{name_or_path} is not one: create it with `clipengine export`, or use backend='torch'"
        )
    from .backends import create_backend

    t_start = time.perf_counter()
    try:
        from .backends.torch_backend import check_device_precision
        from .models.load import load_model
    except ModuleNotFoundError as e:  # no torch ([onnx] installs): the extra to add, not a bare import error
        hint = install_hint(e)
        if hint is None:
            raise
        raise BackendError(f"loading {name_or_path}: {hint}") from e

    # Before the checkpoint is read or downloaded: no CUDA, or fp16 on CPU, was refused only once
    # the whole model had loaded (0.5 s for ViT-B/32, tens of seconds for the largest, or a download).
    check_device_precision(device, precision)
    t_read = time.perf_counter()
    loaded = load_model(name_or_path, pretrained, allow_download=allow_download, arch=opts.pop("arch", None))
    logit_scale = float(loaded.module.logit_scale.detach().float().exp())
    t_engine = time.perf_counter()
    engine = create_backend("torch", loaded.module, device=device, precision=precision, **opts)
    # Where a load's seconds go (shown with `-v`): on an H200 a whole ViT-B/32 load took 7-10 s
    # against ~2 s on this project's CPU, and which step grows there is unmeasured (performance.md).
    _log.info(
        "load %s: torch import %.2f s, checkpoint read and model built %.2f s, %s %s engine %.2f s",
        loaded.name, t_read - t_start, t_engine - t_read, device, precision, time.perf_counter() - t_engine,
    )  # fmt: skip
    return ClipModel(engine, loaded.preprocess, loaded.name, logit_scale, loaded.config.text.context_length)


def _refuse_export_file(path: Path) -> None:
    """An export folder's manifest or one of its engines, given for the folder: read as a checkpoint
    it was 'not a tensor pickle', and backend onnx said to create an export with `clipengine export`."""
    if path.suffix != ".onnx" and path.name != _EXPORT_MANIFEST:
        return
    if path.is_file() and (path.parent / _EXPORT_MANIFEST).is_file():
        raise InputError(
            f"{path} is a file of the export folder {path.parent}; pass the folder itself "
            "(its manifest picks the engines for the precision asked for)"
        )


def _check_export_tag(folder: Path, pretrained: str) -> None:
    """An export folder holds the weights it was exported from: a `pretrained` naming others would
    be ignored without a word, so it must name those."""
    from .export.manifest import read_manifest

    manifest = read_manifest(folder)
    if pretrained != manifest.pretrained:
        held = f"{manifest.model}@{manifest.pretrained}" if manifest.pretrained else f"{manifest.model} (no tag)"
        raise InputError(
            f"{folder} is an export of {held}; pretrained={pretrained!r} names other weights: export those, "
            "or leave pretrained out"
        )


def load_export(
    folder: str | Path, device: str = "cpu", precision: str = "fp32", *, backend: str = "onnx", **opts: Any
) -> ClipModel:
    """A ClipModel over an export folder's ONNX engines (no torch needed), with the preprocessing and
    context length the folder was built with.

    Args:
        folder: a `clipengine export` folder (with manifest.json).
        device: "cpu", "cuda" or "cuda:N" (openvino: "cpu" or an OpenVINO device name).
        precision: a precision the folder holds ("fp32", "fp16", "int8", "int8w"; openvino also "bf16").
        backend: "onnx" (ONNX Runtime) or "openvino" (OpenVINO: the fast CPU path for static INT8).
        **opts: backend options: OnnxBackend (providers, intra_op_threads, tensorrt, verify_files)
            or OpenVinoBackend (threads, verify_files).

    Raises:
        BackendError: not an export folder, missing precision, provider or engine file.
        InputError (a BackendError): `folder` not a str or Path, `device` or `precision` not a str,
            a backend other than onnx/openvino, or options it does not take.
    """
    engine: ExportFolderBackend
    if not isinstance(folder, str | os.PathLike):  # else a TypeError reported below as "bad options []"
        raise InputError(f"folder must be an export folder path (str or Path), got {type(folder).__name__}")
    if backend not in ("onnx", "openvino"):
        raise InputError(f"backend {backend!r} does not run export folders; use 'onnx' or 'openvino'")
    _check_option(device, "device", str, "a device name (str), e.g. 'cpu' or 'cuda'")
    _check_option(precision, "precision", str, "a precision name (str), e.g. 'fp32' or 'int8'")
    from .backends import construct_backend  # options it does not take: InputError; other errors as they are

    if backend == "onnx":
        from .backends.onnx_backend import OnnxBackend

        engine = construct_backend(backend, OnnxBackend, folder, device=device, precision=precision, **opts)  # type: ignore[assignment]
    else:
        from .backends.openvino_backend import OpenVinoBackend

        engine = construct_backend(backend, OpenVinoBackend, folder, device=device, precision=precision, **opts)  # type: ignore[assignment]
    m = engine.manifest
    where = engine.root / _EXPORT_MANIFEST
    if not isinstance(m.preprocess, dict):
        raise BackendError(f'{where}: "preprocess" must be an object, got {type(m.preprocess).__name__}')
    try:
        preprocess_cfg = PreprocessConfig.from_dict(m.preprocess)
    except (ValueError, TypeError) as e:
        raise BackendError(f'{where}: bad "preprocess" section ({e})') from e
    scale = m.logit_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise BackendError(f'{where}: "logit_scale" must be a finite number, got {m.logit_scale!r}')
    name = m.model if m.pretrained is None else f"{m.model}@{m.pretrained}"
    return ClipModel(engine, preprocess_cfg, name, m.logit_scale, m.context_length)
