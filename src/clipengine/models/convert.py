"""Strict checkpoint converters: OpenAI / open_clip / Hugging Face state dicts -> our CLIP keys and config.

Every converter is an explicit recipe (nanoGPT `from_pretrained` style): map the foreign keys to
ours, then check *every* key and shape against the target module before copying anything, and
raise a CheckpointError naming what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..errors import CheckpointError
from .clip import CLIP
from .config import CLIPConfig, TextConfig, VisionConfig, architecture_names, get_config

__all__ = [
    "OPENAI_METADATA_KEYS",
    "check_state_dict",
    "config_from_hf",
    "hf_to_openai",
    "infer_config",
    "load_into",
    "unwrap_state_dict",
]

StateDict = dict[str, torch.Tensor]

# Non-weight entries of OpenAI's TorchScript archives (ints stored as tensors).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Buffers some checkpoints carry that our module rebuilds itself.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|attn_mask)$")
_MAX_LISTED = 8  # keys named per category in an error message


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> StateDict:
    """Reduce a loaded checkpoint to a flat {key: tensor} dict with OpenAI-style keys.

    Handles training checkpoints ({"state_dict": ...} / {"model": ...}), DataParallel's "module."
    prefix, and drops OpenAI's TorchScript metadata and rebuildable buffers.

    Raises:
        CheckpointError: the object holds no tensor dict (the message names `source`).
    """
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (got {type(obj).__name__})")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key.removeprefix("module.")
        if key in OPENAI_METADATA_KEYS or _IGNORED_KEYS.search(key):
            continue
        out[key] = value
    return out


def _fmt(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Compare every key and shape of `state` with `model`; raise before anything is copied.

    Raises:
        CheckpointError: naming missing keys, unexpected keys, shape mismatches and non-float
            tensors where the model holds floats (up to 8 each).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    wrong_dtype = sorted(  # an int / bool / complex tensor where the model holds floats
        f"{k}: checkpoint {state[k].dtype}, model needs floating point"
        for k, v in model.state_dict().items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_fmt(mismatched)}")
    if wrong_dtype:
        problems.append(f"dtype mismatches: {_fmt(wrong_dtype)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {_arch_label(model)}: " + "; ".join(problems))


def _arch_label(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"architecture {cfg.name!r}" if isinstance(cfg, CLIPConfig) else "the model"


def load_into(model: CLIP, state: Mapping[str, torch.Tensor], source: str) -> CLIP:
    """Strictly check `state` against `model`, then load it. Returns `model` in float32, eval mode.

    `model` may live on the meta device (built without random init): the checkpoint's tensors are
    then assigned, not copied. BatchNorm's `num_batches_tracked` counters (unused at inference)
    may be absent from `state`.

    Raises:
        CheckpointError: missing / unexpected keys or shape mismatches (nothing is loaded).
    """
    state = dict(state)
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    check_state_dict(model, state, source)
    on_meta = any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        model.load_state_dict(state, strict=True, assign=on_meta)
    return model.float().eval()


# ----------------------------------------------------------------------------- config from shapes


def _need(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: cannot infer the architecture, key {key!r} is missing")
    return state[key]


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of blocks under `prefix` (max index + 1; gaps surface later as missing keys)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _ratio(hidden: int, width: int) -> float:
    """mlp_ratio whose int(width * ratio) gives back exactly `hidden` despite float rounding."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _vision_from_shapes(state: Mapping[str, torch.Tensor], source: str) -> VisionConfig:
    if "visual.class_embedding" in state or "visual.proj" in state:  # ViT (either: a lost one is then named)
        conv = _need(state, "visual.conv1.weight", source)  # (W, 3, P, P)
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        grid = round((int(_need(state, "visual.positional_embedding", source).shape[0]) - 1) ** 0.5)
        mlp = int(_need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
        return VisionConfig(
            image_size=patch * grid,
            layers=_depth(state, "visual.transformer.resblocks."),
            width=width,
            patch_size=patch,
            head_width=64,
            mlp_ratio=_ratio(mlp, width),
        )
    stem = _need(state, "visual.layer1.0.conv1.weight", source)  # (width, inplanes, 1, 1)
    pos = _need(state, "visual.attnpool.positional_embedding", source)  # (grid*grid + 1, width*32)
    layers = tuple(_depth(state, f"visual.layer{i}.") for i in (1, 2, 3, 4))
    return VisionConfig(
        image_size=round((int(pos.shape[0]) - 1) ** 0.5) * 32,
        layers=layers,  # type: ignore[arg-type]
        width=int(stem.shape[0]),
    )


def _text_from_shapes(state: Mapping[str, torch.Tensor], source: str) -> TextConfig:
    width = int(_need(state, "ln_final.weight", source).shape[0])
    mlp = int(_need(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0])
    return TextConfig(
        context_length=int(_need(state, "positional_embedding", source).shape[0]),
        vocab_size=int(_need(state, "token_embedding.weight", source).shape[0]),
        width=width,
        heads=max(1, width // 64),  # OpenAI's rule; bundled configs / arch hints override it
        layers=_depth(state, "transformer.resblocks."),
        mlp_ratio=_ratio(mlp, width),
    )


def _same_shapes(a: CLIPConfig, b: CLIPConfig) -> bool:
    """Equal in everything the tensors determine (heads and activation are not in the shapes)."""
    norm = {"name": "", "quick_gelu": False}
    va = replace(a.vision, head_width=64, mlp_ratio=a.vision.mlp_width / a.vision.width)
    vb = replace(b.vision, head_width=64, mlp_ratio=b.vision.mlp_width / b.vision.width)
    ta = replace(a.text, heads=1, mlp_ratio=a.text.mlp_width / a.text.width)
    tb = replace(b.text, heads=1, mlp_ratio=b.text.mlp_width / b.text.width)
    return replace(a, vision=va, text=ta, **norm) == replace(b, vision=vb, text=tb, **norm)  # type: ignore[arg-type]


def infer_config(
    state: Mapping[str, torch.Tensor], quick_gelu: bool, *, source: str = "checkpoint"
) -> CLIPConfig:
    """Architecture from tensor shapes (OpenAI `build_model` logic), heads from a bundled config.

    Head counts are not visible in shapes: if the shapes equal a bundled config's (ViT-H/g/bigG use
    head widths 80/88/104), that config's heads and name are used; otherwise heads = width // 64.
    The activation (`quick_gelu`) is not visible either and must come from the caller.

    Raises:
        CheckpointError: a key needed to read the architecture is missing.
    """
    cfg = CLIPConfig(
        embed_dim=int(_need(state, "text_projection", source).shape[1]),
        vision=_vision_from_shapes(state, source),
        text=_text_from_shapes(state, source),
        quick_gelu=quick_gelu,
    )
    for name in architecture_names():
        bundled = get_config(name)
        if _same_shapes(cfg, bundled):
            return bundled.with_quick_gelu(quick_gelu)
    return cfg


# ----------------------------------------------------------------------------- Hugging Face


# transformers' CLIPTextConfig / CLIPVisionConfig defaults (openai/clip-vit-base-patch32). A config.json
# may leave out any value equal to these (transformers' `to_diff_dict` drops them when saving, e.g.
# "image_size": 224 or "hidden_act": "quick_gelu"), and transformers fills them back in on load.
_HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
_HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
}


def _hf_tower(hf: Mapping[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """One tower's settings as transformers' CLIPConfig resolves them.

    Older files (e.g. openai/clip-vit-large-patch14's) also carry `text_config_dict` / `vision_config_dict`; when
    present, transformers builds a full sub-config from it (defaults for what it omits) and lets that
    override `text_config` / `vision_config`, so this does the same.
    """
    values = dict(hf.get(tower) or {})
    legacy = hf.get(f"{tower}_dict")
    if legacy is not None:
        values.update({**defaults, **legacy})
    return {**defaults, **values}


def config_from_hf(hf: Mapping[str, Any], name: str = "custom") -> CLIPConfig:
    """CLIPConfig from a transformers `CLIPModel` config.json (heads and activation are explicit there).

    Values the file leaves out take transformers' defaults, as `CLIPConfig.from_pretrained` does.

    Raises:
        CheckpointError: not a CLIP config, or the two towers use different activations.
    """
    try:
        if not isinstance(hf.get("vision_config") or {}, Mapping) or not isinstance(
            hf.get("text_config") or {}, Mapping
        ):
            raise TypeError("vision_config / text_config must be JSON objects")
        v = _hf_tower(hf, "vision_config", _HF_VISION_DEFAULTS)
        t = _hf_tower(hf, "text_config", _HF_TEXT_DEFAULTS)
        acts = {v["hidden_act"], t["hidden_act"]}
        if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
            raise CheckpointError(
                f"{name}: unsupported activation(s) {sorted(acts)}; need quick_gelu or gelu"
            )
        vw, tw = int(v["hidden_size"]), int(t["hidden_size"])
        return CLIPConfig(
            embed_dim=int(hf.get("projection_dim", 512)),
            vision=VisionConfig(
                image_size=int(v["image_size"]),
                layers=int(v["num_hidden_layers"]),
                width=vw,
                patch_size=int(v["patch_size"]),
                head_width=vw // int(v["num_attention_heads"]),
                mlp_ratio=_ratio(int(v["intermediate_size"]), vw),
            ),
            text=TextConfig(
                context_length=int(t["max_position_embeddings"]),
                vocab_size=int(t["vocab_size"]),
                width=tw,
                heads=int(t["num_attention_heads"]),
                layers=int(t["num_hidden_layers"]),
                mlp_ratio=_ratio(int(t["intermediate_size"]), tw),
            ),
            quick_gelu=acts == {"quick_gelu"},
            name=name,
        )
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{name}: config.json is not a transformers CLIPConfig ({e!r})") from e


# (HF suffix inside an encoder layer, our suffix inside a resblock); q/k/v are packed separately.
_HF_LAYER_MAP = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_TOP_MAP = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: "layrnorm" in transformers
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def hf_to_openai(hf_state: Mapping[str, torch.Tensor], source: str = "HF checkpoint") -> StateDict:
    """Rename a transformers CLIPModel state dict to our (OpenAI) keys.

    q/k/v projections are packed into `in_proj_weight`/`in_proj_bias` (in that order), the two
    projections are transposed (HF Linear stores (D, W); OpenAI a (W, D) matrix).

    Raises:
        CheckpointError: keys it does not recognise, or a layer with an incomplete q/k/v set.
    """
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (our block prefix, weight|bias) -> q/k/v
    unknown: list[str] = []
    for key, value in hf_state.items():
        if _IGNORED_KEYS.search(key):
            continue
        if key in _HF_TOP_MAP:
            out[_HF_TOP_MAP[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _HF_LAYER.match(key):
            tower, index, rest = m.groups()
            block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}"
            proj, _, kind = rest.removeprefix("self_attn.").partition(".")
            if rest.startswith("self_attn.") and proj in _QKV:
                qkv.setdefault((block, kind), {})[proj] = value
            elif rest in _HF_LAYER_MAP:
                out[f"{block}.{_HF_LAYER_MAP[rest]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for a CLIPModel: {_fmt(sorted(unknown))}")
    for (block, kind), parts in sorted(qkv.items()):
        absent = [p for p in _QKV if p not in parts]
        if absent:
            raise CheckpointError(f"{source}: {block} lacks {', '.join(f'{p}.{kind}' for p in absent)}")
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out
