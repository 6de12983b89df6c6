"""What the Ray driver needs to know about the model, read from the files that describe it.

The driver only needs the model's preprocessing (for run.json and the actors' decode); the actors
load the model. Loading it on the driver as well kept a whole model (151M parameters for ViT-B-32,
an ONNX Runtime session for an export) in the driver's memory for the length of the job.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..image.preprocess import PreprocessConfig
from ..models.registry import get_source
from ..models.spec import parse_spec
from ..models.weights import cache_path, fetch, is_cached

__all__ = ["preprocess_config"]

_MANIFEST = "manifest.json"  # an export folder (`clipengine export`)
_CONFIG = "config.json"  # a clipengine model folder: CLIPConfig + "preprocess"


def preprocess_config(
    name_or_path: str | Path, pretrained: str | None = None, *, allow_download: bool = False
) -> PreprocessConfig | None:
    """The preprocessing `clipengine.load(name_or_path, pretrained=...)` would give, without loading
    the weights: from an export's manifest, a clipengine model folder's config.json, or the registry.

    Returns None where only loading tells (checkpoint files, transformers / open_clip / hub folders,
    a file it cannot read: the load then reports it).

    Raises:
        UnknownModelError: an unknown registry name or tag (as `load`).
        DownloadNotAllowedError, DownloadError: registered weights not in the cache (as `load`:
            downloaded here with `allow_download`, so the actors find them).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / _MANIFEST).is_file():
        return _from_json(path / _MANIFEST, None if pretrained is None else ("pretrained", pretrained))
    spec = parse_spec(name_or_path, pretrained)
    if spec.kind == "registry":
        source = get_source(spec.name, spec.tag)
        if not is_cached(source):  # the load's error now, not one from every actor
            fetch(source, allow_download=allow_download)
        if source.format != "clipengine":
            return source.preprocess
        folder = cache_path(source).parent
    elif spec.kind == "folder" and spec.path is not None:
        folder = spec.path
    else:
        return None
    return _from_json(folder / _CONFIG, None)


def _from_json(path: Path, expect: tuple[str, str] | None) -> PreprocessConfig | None:
    """The "preprocess" object of `path`, or None when the file or the object is not as expected."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "vision_config" in data:  # a transformers folder: no "preprocess"
        return None
    if expect is not None and data.get(expect[0]) != expect[1]:
        return None  # an export of other weights: the load raises that
    values = data.get("preprocess")
    if not isinstance(values, dict):
        return None
    try:
        return PreprocessConfig.from_dict(values)
    except (TypeError, ValueError):
        return None
