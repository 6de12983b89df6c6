"""Real-checkpoint readiness for every registered architecture and tag, without the real files.

The released files cannot be downloaded here, so their layout comes from the libraries that wrote
them: open_clip's own full-size models (OpenAI releases hold the same keys plus three int metadata
entries, LAION `.bin` files are open_clip state dicts) and transformers' CLIPModel (the HF folders),
built on the meta device: every key, shape and dtype, no memory. Each goes through the converter
`load_model` uses for that format, into our CLIP on meta, strictly. Heads and activation are not in
the shapes, so they are compared with the reference modules; preprocessing and download locations
with open_clip's pretrained registry.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from clipengine.image.preprocess import PreprocessConfig
from clipengine.models.clip import CLIP
from clipengine.models.config import CLIPConfig, architecture_names, get_config
from clipengine.models.convert import (
    OPENAI_METADATA_KEYS,
    config_from_hf,
    hf_to_openai,
    infer_config,
    load_into,
    unwrap_state_dict,
)
from clipengine.models.registry import WeightSource, sources

RELEASES = [s for s in sources() if s.format in ("openai", "open_clip")]
VIT_RELEASES = [s for s in RELEASES if not get_config(s.arch).vision.is_resnet]


def _import(name: str) -> Any:
    try:
        return pytest.importorskip(name, reason=f"{name} is the reference for real checkpoint layouts")
    except RuntimeError as e:  # e.g. a torchvision whose C++ ops do not load (see tests/conftest.py)
        pytest.skip(f"{name} cannot be imported here: {e}")


@pytest.fixture(scope="module")
def open_clip() -> Any:
    return _import("open_clip")


@pytest.fixture(scope="module")
def transformers() -> Any:
    return _import("transformers")


def _meta_clip(cfg: CLIPConfig) -> CLIP:
    with torch.device("meta"):
        return CLIP(cfg)


def _open_clip_meta(open_clip: Any, src: WeightSource) -> Any:
    """open_clip's model for this arch and tag, QuickGELU where open_clip's registry says so for
    the tag (as `create_model(arch, pretrained=tag)` does), not where ours does."""
    quick_gelu = bool(open_clip.get_pretrained_cfg(src.arch, src.tag).get("quick_gelu", False))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return open_clip.create_model(src.arch, pretrained=None, device="meta", force_quick_gelu=quick_gelu)


def _release_state(open_clip: Any, src: WeightSource) -> dict[str, Any]:
    """The release file's entries: open_clip's state dict; OpenAI's .pt adds fp16 and metadata;
    open_clip's GitHub releases are training checkpoints (DataParallel's "module." on every key)."""
    state = dict(_open_clip_meta(open_clip, src).state_dict())
    if src.format == "openai":  # OpenAI ships fp16 weights and three ints beside them
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        cfg = get_config(src.arch)
        meta = (cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size)
        state.update({k: torch.tensor(v) for k, v in zip(OPENAI_METADATA_KEYS, meta, strict=True)})
    if (src.url or "").startswith("https://github.com/mlfoundations/open_clip/releases/"):
        return {"epoch": 32, "name": src.tag, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    return state


@pytest.mark.parametrize("src", RELEASES, ids=lambda s: s.key)
def test_release_file_loads_by_name_and_by_path(open_clip: Any, src: WeightSource) -> None:
    state = unwrap_state_dict(_release_state(open_clip, src))
    cfg = get_config(src.arch).with_quick_gelu(src.quick_gelu)  # what load_model("ARCH@TAG") builds
    load_into(_meta_clip(cfg), state, src.key)  # strict: no missing, unexpected or mis-shaped key
    assert infer_config(state, src.quick_gelu) == cfg  # the same file loaded by path


def _heads_and_act(model: Any) -> tuple[int, int, str]:
    """(text heads, vision heads, activation class) of an open_clip CLIP or ours."""

    def heads(attn: Any) -> int:
        return int(getattr(attn, "num_heads", getattr(attn, "heads", 0)))

    visual = model.visual
    vision = visual.attnpool if hasattr(visual, "attnpool") else visual.transformer.resblocks[0].attn
    block = model.transformer.resblocks[0]
    return heads(block.attn), heads(vision), type(block.mlp.gelu).__name__


@pytest.mark.parametrize("src", RELEASES, ids=lambda s: s.key)
def test_heads_and_activation_match_open_clip(open_clip: Any, src: WeightSource) -> None:
    ours = _heads_and_act(_meta_clip(get_config(src.arch).with_quick_gelu(src.quick_gelu)))
    assert ours == _heads_and_act(_open_clip_meta(open_clip, src))
    assert ours[2] == ("QuickGELU" if src.quick_gelu else "GELU")


@pytest.mark.parametrize("src", RELEASES, ids=lambda s: s.key)
def test_registry_entry_matches_open_clip_pretrained_cfg(open_clip: Any, src: WeightSource) -> None:
    pretrained = open_clip.get_pretrained_cfg(src.arch, src.tag)
    assert pretrained, f"open_clip has no {src.key}"
    assert src.preprocess == PreprocessConfig(
        image_size=open_clip.get_model_config(src.arch)["vision_cfg"]["image_size"],
        mean=pretrained["mean"],
        std=pretrained["std"],
        interpolation=pretrained["interpolation"],
        resize_mode=pretrained["resize_mode"],
    )
    assert src.quick_gelu == bool(pretrained.get("quick_gelu", False))
    if src.url is not None and not src.url.startswith("https://huggingface.co/"):
        assert src.url == pretrained["url"]  # OpenAI's files and open_clip's GitHub releases
    else:
        repo = pretrained["hf_hub"].rstrip("/")
        assert src.url == f"https://huggingface.co/{repo}/resolve/main/{src.filename}"


@pytest.mark.parametrize("arch", architecture_names())
def test_open_clip_hub_config_reads_as_the_bundled_config(open_clip: Any, arch: str) -> None:
    """open_clip_config.json's model_cfg (hf-hub folders) is open_clip's model config for the arch."""
    model_cfg = open_clip.get_model_config(arch)
    cfg = CLIPConfig.from_dict(model_cfg, name=arch)
    assert cfg == get_config(arch).with_quick_gelu(cfg.quick_gelu)


def _hf_json(transformers: Any, cfg: CLIPConfig, style: str) -> dict[str, Any]:
    """config.json of a transformers CLIPModel with `cfg`'s sizes, as the hub files are written.

    "full": every value; "diff": values equal to transformers' defaults left out (as its
    `to_diff_dict` saves them); "legacy": also `*_config_dict` copies (older files, e.g.
    openai/clip-vit-large-patch14's); "stale": `*_config` holding only
    transformers' defaults and `*_config_dict` the real values, which transformers lets win.
    """
    v, t = cfg.vision, cfg.text
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    text = {
        "hidden_size": t.width,
        "intermediate_size": t.mlp_width,
        "num_attention_heads": t.heads,
        "num_hidden_layers": t.layers,
        "max_position_embeddings": t.context_length,
        "vocab_size": t.vocab_size,
        "hidden_act": act,
    }
    vision = {
        "hidden_size": v.width,
        "intermediate_size": v.mlp_width,
        "num_attention_heads": v.heads,
        "num_hidden_layers": v.layers,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": act,
    }
    if style != "full":
        text_defaults = transformers.CLIPTextConfig().to_dict()
        vision_defaults = transformers.CLIPVisionConfig().to_dict()
        text = {k: x for k, x in text.items() if text_defaults.get(k) != x}
        vision = {k: x for k, x in vision.items() if vision_defaults.get(k) != x}
    out: dict[str, Any] = {"projection_dim": cfg.embed_dim, "text_config": text, "vision_config": vision}
    if style in ("legacy", "stale"):
        out.update(text_config_dict=dict(text), vision_config_dict=dict(vision))
    if style == "stale":
        out.update(text_config=text_defaults, vision_config=vision_defaults)
    return out


@pytest.mark.parametrize("style", ["full", "diff", "legacy", "stale"])
@pytest.mark.parametrize("src", VIT_RELEASES, ids=lambda s: s.key)
def test_hf_clipmodel_converts_into_the_bundled_architecture(
    transformers: Any, src: WeightSource, style: str
) -> None:
    expected = get_config(src.arch).with_quick_gelu(src.quick_gelu)
    config_json = _hf_json(transformers, expected, style)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        # a copy: transformers updates *_config in place from *_config_dict
        reference = transformers.CLIPModel(transformers.CLIPConfig(**copy.deepcopy(config_json)))
    hf_state = dict(reference.state_dict())
    for tower in ("text_model", "vision_model"):  # persistent buffers in older files
        hf_state[f"{tower}.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long, device="meta")
    state = hf_to_openai(hf_state, src.key)

    cfg = config_from_hf(config_json, name=src.arch)
    load_into(_meta_clip(cfg), state, src.key)
    assert (cfg.text.heads, cfg.vision.heads, cfg.quick_gelu) == (
        reference.config.text_config.num_attention_heads,
        reference.config.vision_config.num_attention_heads,
        src.quick_gelu,
    )
    assert infer_config(state, src.quick_gelu) == expected  # same shapes as the bundled config
    assert (cfg.text.heads, cfg.vision.heads) == (expected.text.heads, expected.vision.heads)
