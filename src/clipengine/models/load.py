"""Load any supported model reference into a CLIP module + config + preprocessing (`load_model`).

Formats: registry names (`ViT-B-32@openai`), `hf-hub:org/name`, OpenAI TorchScript archives and
plain state dicts, open_clip `.bin` / `.safetensors` / training checkpoints, transformers CLIPModel
folders, and our own folders (`config.json` + `model.safetensors`, written by `models.saving`).
Reading checkpoint files safely lives in `models.checkpoint`.

Activation (QuickGELU vs GELU) cannot be read from tensor shapes. It is decided, first match wins,
by: a "-quickgelu" name or `arch`; a CLIPConfig passed as `arch`; the registry entry; the file's own
config (HF `hidden_act`, open_clip_config.json, our config.json); the format (OpenAI archive ->
QuickGELU, any other plain state dict -> GELU, open_clip's convention).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..image.preprocess import PreprocessConfig
from .checkpoint import StateDict, read_checkpoint
from .clip import CLIP, causal_mask
from .config import CLIPConfig, config_problems, get_config
from .convert import config_from_hf, hf_to_openai, infer_config, load_into
from .registry import get_source
from .saving import CONFIG_FILE, WEIGHTS_FILE, save_model
from .spec import ModelSpec, parse_spec
from .weights import ProgressCallback, fetch, fetch_hub

_log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "read_checkpoint", "save_model"]

_OPEN_CLIP_CONFIG = "open_clip_config.json"
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes in preprocessor_config


@dataclass(frozen=True)
class LoadedModel:
    """A ready CLIP module (eval mode, fp32, CPU) and everything needed to feed it."""

    module: CLIP
    config: CLIPConfig
    preprocess: PreprocessConfig
    name: str  # architecture name ("ViT-B-32") or the checkpoint's stem for custom shapes
    pretrained: str | None  # registry tag, if loaded by name
    source: str  # file or folder the weights came from


@dataclass(frozen=True)
class _Hints:
    arch: CLIPConfig | None = None  # exact config to use (heads etc.); shapes are still checked
    quick_gelu: bool | None = None  # forced activation


def load_model(
    name_or_path: str | Path,
    pretrained: str | None = None,
    *,
    allow_download: bool = False,
    arch: str | CLIPConfig | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load a model by name, hub id, checkpoint file or folder.

    Args:
        name_or_path: "ViT-B-32", "ViT-B-32@laion2b_s34b_b79k", "hf-hub:org/name", a checkpoint
            file (.pt/.bin/.safetensors) or a folder (transformers CLIPModel, open_clip hub, ours).
        pretrained: tag, alternative to "NAME@TAG".
        allow_download: fetch missing weights (never otherwise).
        arch: architecture for a bare checkpoint: a bundled name ("ViT-H-14", "RN50-quickgelu")
            or a CLIPConfig. Needed only when head counts differ from width // 64 and the shapes
            match no bundled config.
        progress: download progress callback (bytes_done, bytes_total).

    Raises:
        UnknownModelError, CheckpointError, DownloadNotAllowedError, DownloadError.
    """
    spec = parse_spec(name_or_path, pretrained)
    hints = _hints(arch, spec)
    if spec.kind == "registry":
        source = get_source(spec.name, spec.tag)
        if hints.arch is not None and hints.arch.name.removesuffix("-quickgelu") != source.arch:
            raise CheckpointError(  # a clipengine-format entry ignored it, the others failed on shapes
                f"arch={hints.arch.name!r} does not fit {source.key}, a {source.arch}: arch= names the "
                "architecture of a checkpoint file or folder; drop it for a registered model"
            )
        path = fetch(source, allow_download=allow_download, progress=progress)
        if source.format == "clipengine":
            return _load_folder(path.parent, hints, spec, tag=source.tag)
        quick = hints.quick_gelu if hints.quick_gelu is not None else source.quick_gelu
        state, _ = read_checkpoint(path)
        cfg = hints.arch or get_config(source.arch)
        cfg = cfg.with_quick_gelu(quick)
        module = _load(cfg, state, str(path))
        return LoadedModel(module, cfg, source.preprocess, source.arch, source.tag, str(path))
    if spec.kind == "hf-hub":
        folder = fetch_hub(spec.name, allow_download=allow_download, progress=progress)
        return _load_folder(folder, hints, spec)
    assert spec.path is not None  # parse_spec sets it for file/folder kinds
    if spec.kind == "folder":
        return _load_folder(spec.path, hints, spec)
    return _load_file(spec.path, hints, preprocess=None)


def _hints(arch: str | CLIPConfig | None, spec: ModelSpec) -> _Hints:
    quick = spec.quick_gelu
    if isinstance(arch, CLIPConfig):
        return _Hints(arch, quick if quick is not None else arch.quick_gelu)
    if arch is None:
        return _Hints(None, quick)
    hinted = parse_spec(arch)
    if hinted.kind != "registry" or hinted.tag:
        raise CheckpointError(f"arch={arch!r} must be a bundled architecture name such as 'ViT-B-32'")
    return _Hints(get_config(hinted.name), quick if quick is not None else hinted.quick_gelu)


def _empty_model(cfg: CLIPConfig) -> CLIP:
    """CLIP(cfg) on the meta device: no random init (seconds for ViT-B, minutes for bigG)."""
    with torch.device("meta"):
        return CLIP(cfg)


def _checked(cfg: CLIPConfig, where: str | Path) -> CLIPConfig:
    """`cfg`, or a CheckpointError naming `where` (the file the settings came from) and each bad setting."""
    problems = config_problems(cfg)
    if problems:
        raise CheckpointError(f"{where}: bad architecture settings ({'; '.join(problems)})")
    return cfg


def _load(cfg: CLIPConfig, state: StateDict, source: str) -> CLIP:
    """Strictly load `state` into a fresh CLIP(cfg); rebuild the non-persistent causal mask."""
    module = load_into(_empty_model(_checked(cfg, source)), state, source)
    module.attn_mask = causal_mask(cfg.text.context_length)  # non-persistent: not in checkpoints
    stray = [name for name, buf in module.named_buffers() if buf.is_meta]
    if stray:
        raise CheckpointError(f"{source}: buffers not restored: {', '.join(stray)}")
    return module.eval()


def _load_file(path: Path, hints: _Hints, preprocess: PreprocessConfig | None) -> LoadedModel:
    state, openai = read_checkpoint(path)
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        state = hf_to_openai(state, str(path))  # a bare transformers state dict
    quick = hints.quick_gelu if hints.quick_gelu is not None else openai
    cfg = hints.arch.with_quick_gelu(quick) if hints.arch else infer_config(state, quick, source=str(path))
    module = _load(cfg, state, str(path))
    name = cfg.name if cfg.name != "custom" else path.stem
    if preprocess is None:
        preprocess = PreprocessConfig(image_size=cfg.vision.image_size)
        if not openai:  # OpenAI's files mean OpenAI's preprocessing; an open_clip / HF file says nothing
            _warn_unnamed_preprocessing(path, cfg.name, preprocess)
    return LoadedModel(module, cfg, preprocess, name, None, str(path))


def _warn_unnamed_preprocessing(path: Path, arch: str, used: PreprocessConfig) -> None:
    """A bare weights file names no tag, so it gets OpenAI's preprocessing. Where registered weights
    of its architecture were trained with other values (ViT-L-14 laion2b: mean = std = 0.5), they
    would be used with the wrong ones without a word: say so, and how to load them with theirs."""
    from . import registry

    if arch not in registry.architectures():
        return
    other = [tag for tag in registry.tags(arch) if registry.get_source(arch, tag).preprocess != used]
    if other:
        _log.warning(
            "%s: a weights file names no pretrained tag, so it gets OpenAI's preprocessing (mean %s, std %s); "
            "%s weights of %s were trained with other values. If these are those weights, load them as "
            "%s@TAG once the file is in the cache (`clipengine download %s@TAG` names the path), or as an "
            "open_clip hub folder.", path, used.mean, used.std, ", ".join(other), arch, arch, arch,
        )  # fmt: skip


# ----------------------------------------------------------------------------- folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not JSON
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_folder(folder: Path, hints: _Hints, spec: ModelSpec, tag: str | None = None) -> LoadedModel:
    if (folder / _OPEN_CLIP_CONFIG).is_file():
        return _load_open_clip_folder(folder, hints)
    config_path = folder / CONFIG_FILE
    # export.manifest.MANIFEST_FILE (models does not import export): `clipengine export EXPORT_FOLDER`
    # said only that config.json is missing.
    if not config_path.is_file() and (folder / "manifest.json").is_file():
        raise CheckpointError(
            f"{folder}: an export folder (ONNX engines and manifest.json), not weights PyTorch loads: run it "
            "with --backend onnx or openvino; to export again, export the checkpoint or model folder it came from"
        )
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no {CONFIG_FILE} or {_OPEN_CLIP_CONFIG}; expected a transformers CLIPModel folder, "
            "an open_clip hub folder, or a clipengine model folder" + _registered_name_hint(spec)
        )
    config = _read_json(config_path)
    if "vision_config" in config:
        return _load_hf_folder(folder, config, hints)
    # arch= applies as to open_clip and transformers folders (it was ignored here without a word).
    cfg = hints.arch or _config(config_path, config, config.get("name") or folder.name)
    if hints.quick_gelu is not None:
        cfg = cfg.with_quick_gelu(hints.quick_gelu)
    preprocess = _preprocess(config_path, config["preprocess"]) if "preprocess" in config else None
    weights = folder / WEIGHTS_FILE
    state, _ = read_checkpoint(_existing(weights))
    module = _load(cfg, state, str(weights))
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    name = spec.name if spec.kind == "registry" else cfg.name
    return LoadedModel(module, cfg, preprocess, name, tag, str(folder))


def _registered_name_hint(spec: ModelSpec) -> str:
    """A bare name ("ViT-B-32", the CLI's default --model) is a path first: beside a folder of that
    name (an output folder, say) it loads the folder. Where the name is also registered, say how to
    get the registered weights."""
    from . import registry

    name = spec.raw.strip()
    if spec.kind != "folder" or name not in registry.architectures():
        return ""
    return f"; {name!r} named this folder, not the registered model: write {name}@{registry.default_tag(name)} for that"


def _config(path: Path, values: dict[str, Any], name: str) -> CLIPConfig:
    try:
        cfg = CLIPConfig.from_dict(values, name=name)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad architecture settings ({e!r})") from e
    return _checked(cfg, path)


def _existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(f"no weights file: looked for {', '.join(str(p) for p in candidates)}")


def _load_open_clip_folder(folder: Path, hints: _Hints) -> LoadedModel:
    meta = _read_json(folder / _OPEN_CLIP_CONFIG)
    model_cfg = meta.get("model_cfg", meta)
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{folder / _OPEN_CLIP_CONFIG}: model_cfg is not a JSON object")
    cfg = hints.arch or _config(folder / _OPEN_CLIP_CONFIG, model_cfg, folder.name.split("--")[-1])
    quick = hints.quick_gelu if hints.quick_gelu is not None else bool(model_cfg.get("quick_gelu", False))
    pp = meta.get("preprocess_cfg", {})
    if not isinstance(pp, dict):
        raise CheckpointError(f"{folder / _OPEN_CLIP_CONFIG}: preprocess_cfg is not a JSON object")
    pp = {"image_size": cfg.vision.image_size, **{k: v for k, v in pp.items() if k in _PP_KEYS}}
    preprocess = _preprocess(folder / _OPEN_CLIP_CONFIG, pp)
    weights = _existing(folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin")
    return _load_file(weights, _Hints(cfg, quick), preprocess)


_PP_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _load_hf_folder(folder: Path, config: dict[str, Any], hints: _Hints) -> LoadedModel:
    cfg = hints.arch or _checked(config_from_hf(config, name=folder.name), folder / CONFIG_FILE)
    if hints.quick_gelu is not None:
        cfg = cfg.with_quick_gelu(hints.quick_gelu)
    state = _read_hf_weights(folder)
    source = str(folder)
    module = _load(cfg, hf_to_openai(state, source), source)
    return LoadedModel(module, cfg, _hf_preprocess(folder, cfg), cfg.name, None, source)


def _read_hf_weights(folder: Path) -> StateDict:
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if index.is_file():  # sharded safetensors
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> shard file name")
        shards = sorted(set(weight_map.values()))
        state: StateDict = {}
        for shard in shards:
            state.update(read_checkpoint(folder / shard)[0])
        return state
    return read_checkpoint(_existing(folder / WEIGHTS_FILE, folder / "pytorch_model.bin"))[0]


def _hf_preprocess(folder: Path, cfg: CLIPConfig) -> PreprocessConfig:
    """PreprocessConfig from preprocessor_config.json (CLIPImageProcessor), else OpenAI defaults."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessConfig(image_size=cfg.vision.image_size)
    pp = _read_json(path)
    kwargs: dict[str, Any] = {"image_size": _hf_crop_size(path, pp.get("crop_size"), cfg.vision.image_size)}
    if "image_mean" in pp:
        kwargs["mean"] = pp["image_mean"]
    if "image_std" in pp:
        kwargs["std"] = pp["image_std"]
    resample = pp.get("resample")
    if resample is not None and not isinstance(resample, int):  # a list or dict is no key of _HF_RESAMPLE
        raise CheckpointError(f"{path}: bad preprocessing settings (resample {resample!r} is not a PIL code)")
    if resample in _HF_RESAMPLE:
        kwargs["interpolation"] = _HF_RESAMPLE[resample]
    return _preprocess(path, kwargs)


def _hf_crop_size(path: Path, crop: Any, default: int) -> int:
    """`crop_size` as CLIPImageProcessor writes it: {"height": H, "width": W}, or an int in older files;
    absent or null means the default (transformers' own; here the model's input size)."""
    if crop is None:
        return default
    size = crop.get("height", default) if isinstance(crop, dict) else crop
    try:
        pixels = int(size)
    except (TypeError, ValueError):
        pixels = 0
    if pixels <= 0:
        raise CheckpointError(f"{path}: bad preprocessing settings (crop_size {crop!r} is not a size in pixels)")
    return pixels


def _preprocess(path: Path, values: dict[str, Any]) -> PreprocessConfig:
    try:
        return PreprocessConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad preprocessing settings ({e})") from e
