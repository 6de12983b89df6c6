"""Load any supported model reference into a CLIP module + config + preprocessing (`load_model`).

Formats: registry names (`ViT-B-32@openai`), `hf-hub:org/name`, OpenAI TorchScript archives and
plain state dicts, open_clip `.bin` / `.safetensors` / training checkpoints, transformers CLIPModel
folders, and our own folders (`config.json` + `model.safetensors`, see `save_model`).

Activation (QuickGELU vs GELU) cannot be read from tensor shapes. It is decided, first match wins,
by: a "-quickgelu" name or `arch`; a CLIPConfig passed as `arch`; the registry entry; the file's own
config (HF `hidden_act`, open_clip_config.json, our config.json); the format (OpenAI archive ->
QuickGELU, any other plain state dict -> GELU, open_clip's convention).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import secrets
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import fsync_dir, fsync_file, replace_durably
from ..image.preprocess import PreprocessConfig
from .clip import CLIP, causal_mask
from .config import CLIPConfig, get_config
from .convert import (
    OPENAI_METADATA_KEYS,
    config_from_hf,
    hf_to_openai,
    infer_config,
    load_into,
    unwrap_state_dict,
)
from .registry import get_source
from .spec import ModelSpec, parse_spec
from .weights import ProgressCallback, fetch, fetch_hub

__all__ = ["LoadedModel", "load_model", "read_checkpoint", "save_model"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_CONFIG_FILE = "config.json"  # ours (CLIPConfig.to_dict() + "preprocess") or transformers'
_WEIGHTS_FILE = "model.safetensors"
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


def _load(cfg: CLIPConfig, state: StateDict, source: str) -> CLIP:
    """Strictly load `state` into a fresh CLIP(cfg); rebuild the non-persistent causal mask."""
    module = load_into(_empty_model(cfg), state, source)
    module.attn_mask = causal_mask(cfg.text.context_length)  # non-persistent: not in checkpoints
    stray = [name for name, buf in module.named_buffers() if buf.is_meta]
    if stray:
        raise CheckpointError(f"{source}: buffers not restored: {', '.join(stray)}")
    return module.eval()


# ----------------------------------------------------------------------------- files


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _is_torchscript(path: Path) -> bool:
    """OpenAI's .pt releases are TorchScript zip archives (they carry a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def read_checkpoint(path: Path) -> tuple[StateDict, bool]:
    """Read a checkpoint file into a flat state dict; second value: it is an OpenAI release.

    `.safetensors` via safetensors; TorchScript archives via `torch.jit.load` (TorchScript runs no
    Python code on load); everything else via `torch.load(weights_only=True)`, which refuses
    pickled code.

    Raises:
        CheckpointError: unreadable file, or a pickle that needs arbitrary code.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except SafetensorError as e:  # empty, truncated or not a safetensors file
                raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from e
            return unwrap_state_dict(tensors), False
        if _is_torchscript(path):
            archive = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            raw: Any = archive.state_dict()
            return unwrap_state_dict(dict(raw)), True
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a tensor pickle)") from e
        raise CheckpointError(
            f"{path}: refusing to unpickle it: it needs the Python object {found.group(1)}, and loading "
            "it could run arbitrary code; re-save it as a plain state dict or .safetensors"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from e
    except (KeyError, IndexError) as e:  # torch's unpickler on text: "hello" -> memo KeyError, "a" -> empty stack
        raise CheckpointError(f"{path}: not a readable checkpoint (not a tensor pickle)") from e
    openai = isinstance(raw, dict) and any(k in raw for k in OPENAI_METADATA_KEYS)
    return unwrap_state_dict(raw), openai


def _load_file(path: Path, hints: _Hints, preprocess: PreprocessConfig | None) -> LoadedModel:
    state, openai = read_checkpoint(path)
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        state = hf_to_openai(state, str(path))  # a bare transformers state dict
    quick = hints.quick_gelu if hints.quick_gelu is not None else openai
    cfg = hints.arch.with_quick_gelu(quick) if hints.arch else infer_config(state, quick, source=str(path))
    module = _load(cfg, state, str(path))
    name = cfg.name if cfg.name != "custom" else path.stem
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    return LoadedModel(module, cfg, preprocess, name, None, str(path))


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
    config_path = folder / _CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no {_CONFIG_FILE} or {_OPEN_CLIP_CONFIG}; expected a transformers CLIPModel folder, "
            "an open_clip hub folder, or a clipengine model folder"
        )
    config = _read_json(config_path)
    if "vision_config" in config:
        return _load_hf_folder(folder, config, hints)
    cfg = _config(config_path, config, config.get("name") or folder.name)
    if hints.quick_gelu is not None:
        cfg = cfg.with_quick_gelu(hints.quick_gelu)
    preprocess = _preprocess(config_path, config["preprocess"]) if "preprocess" in config else None
    weights = folder / _WEIGHTS_FILE
    state, _ = read_checkpoint(_existing(weights))
    module = _load(cfg, state, str(weights))
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    name = spec.name if spec.kind == "registry" else cfg.name
    return LoadedModel(module, cfg, preprocess, name, tag, str(folder))


def _config(path: Path, values: dict[str, Any], name: str) -> CLIPConfig:
    try:
        return CLIPConfig.from_dict(values, name=name)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad architecture settings ({e!r})") from e


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
    pp = {"image_size": cfg.vision.image_size, **{k: v for k, v in pp.items() if k in _PP_KEYS}}
    preprocess = _preprocess(folder / _OPEN_CLIP_CONFIG, pp)
    weights = _existing(folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin")
    return _load_file(weights, _Hints(cfg, quick), preprocess)


_PP_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _load_hf_folder(folder: Path, config: dict[str, Any], hints: _Hints) -> LoadedModel:
    cfg = hints.arch or config_from_hf(config, name=folder.name)
    if hints.quick_gelu is not None:
        cfg = cfg.with_quick_gelu(hints.quick_gelu)
    state = _read_hf_weights(folder)
    source = str(folder)
    module = _load(cfg, hf_to_openai(state, source), source)
    return LoadedModel(module, cfg, _hf_preprocess(folder, cfg), cfg.name, None, source)


def _read_hf_weights(folder: Path) -> StateDict:
    index = folder / f"{_WEIGHTS_FILE}.index.json"
    if index.is_file():  # sharded safetensors
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state: StateDict = {}
        for shard in shards:
            state.update(read_checkpoint(folder / shard)[0])
        return state
    return read_checkpoint(_existing(folder / _WEIGHTS_FILE, folder / "pytorch_model.bin"))[0]


def _hf_preprocess(folder: Path, cfg: CLIPConfig) -> PreprocessConfig:
    """PreprocessConfig from preprocessor_config.json (CLIPImageProcessor), else OpenAI defaults."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessConfig(image_size=cfg.vision.image_size)
    pp = _read_json(path)
    crop = pp.get("crop_size", cfg.vision.image_size)
    size = crop.get("height", cfg.vision.image_size) if isinstance(crop, dict) else int(crop)
    kwargs: dict[str, Any] = {"image_size": int(size)}
    if "image_mean" in pp:
        kwargs["mean"] = pp["image_mean"]
    if "image_std" in pp:
        kwargs["std"] = pp["image_std"]
    if pp.get("resample") in _HF_RESAMPLE:
        kwargs["interpolation"] = _HF_RESAMPLE[pp["resample"]]
    return _preprocess(path, kwargs)


def _preprocess(path: Path, values: dict[str, Any]) -> PreprocessConfig:
    try:
        return PreprocessConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad preprocessing settings ({e})") from e


# ----------------------------------------------------------------------------- saving


def save_model(module: CLIP, folder: str | Path, preprocess: PreprocessConfig | None = None) -> Path:
    """Write `module` as a clipengine model folder: config.json (+ "preprocess") + model.safetensors.

    The folder loads back with `load_model(folder)` (and is the format of packaged weights). The
    save is atomic: both files are written into a hidden temp folder beside `folder`, which then
    takes its place. If writing fails, a previous save in `folder` is left as it was and the temp
    folder is removed; readers never see new config.json beside old or half-written weights.

    Raises:
        CheckpointError: `folder` is a file, or a folder holding anything besides a saved model
            (a save replaces the folder as a whole).
    """
    from safetensors.torch import save_file

    target = Path(folder).resolve()  # a symlinked folder: replace what it points to, not the link
    _recover_interrupted_save(target)
    _check_replaceable(target)
    cfg = module.config
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    config = {**cfg.to_dict(), "preprocess": preprocess.to_dict()}
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v).contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so the saved folder gets the usual permissions.
    work = target.parent / f".{target.name}.{secrets.token_hex(4)}.saving"
    work.mkdir()
    try:
        (work / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(work / _WEIGHTS_FILE))
        for name in _SAVED_FILES:  # data and names on disk before the rename publishes them
            fsync_file(work / name)
        fsync_dir(work)
        _swap_in(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # already moved into place after a successful save
    return Path(folder)


_SAVED_FILES = (_CONFIG_FILE, _WEIGHTS_FILE)


def _recover_interrupted_save(target: Path) -> None:
    """Undo what a killed `save_model` into `target` left: its half-written `.NAME.<hex>.saving`
    folders go, and a previous save renamed aside as `.NAME.<hex>.old` goes back to `target` when
    `target` is missing (killed between `_swap_in`'s two renames), else goes too. Only folders
    named exactly as a save names them are touched."""
    if not target.parent.is_dir():
        return
    ours = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(saving|old)")
    leftovers = [p for p in target.parent.iterdir() if ours.fullmatch(p.name) and p.is_dir()]
    for p in leftovers:
        if p.name.endswith(".saving"):
            shutil.rmtree(p, ignore_errors=True)
    previous = sorted((p for p in leftovers if p.name.endswith(".old")), key=lambda p: p.stat().st_mtime)
    if previous and not target.exists():
        log.info("restoring %s from an interrupted save (%s)", target, previous[-1].name)
        replace_durably(previous.pop(), target)
    for p in previous:
        shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a file, or a folder with content other than a previous save (it would be lost)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; save the model to a new folder")
    other = sorted(p.name for p in folder.iterdir() if p.name not in _SAVED_FILES)
    if other:
        raise CheckpointError(
            f"{folder}: holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''} besides a saved "
            "model, and a save replaces the whole folder; save to a new or empty folder"
        )


def _swap_in(work: Path, folder: Path) -> None:
    """Put the finished `work` folder at `folder`, replacing a previous save.

    rename(2) cannot replace a non-empty folder, so a previous save is first renamed aside, and
    removed only once the new one is in place (renamed back if that fails). A crash between the
    two renames leaves no `folder`, and the previous save intact beside it as `.NAME.*.old`.
    The parent folder is fsynced before the previous save is removed: else a power loss could undo
    the renames but not the removal, putting a half-deleted save back under `folder`.
    """
    if not folder.exists():
        replace_durably(work, folder)
        return
    old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
    os.replace(folder, old)
    try:
        replace_durably(work, folder)
    except BaseException:
        replace_durably(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
