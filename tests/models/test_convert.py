"""Strict converters: shape-based config inference, key checks that name the problem, HF key map."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from clipengine.errors import CheckpointError
from clipengine.models.clip import CLIP, build_model
from clipengine.models.config import CLIPConfig, architecture_names, get_config
from clipengine.models.convert import (
    check_state_dict,
    config_from_hf,
    hf_to_openai,
    infer_config,
    load_into,
    unwrap_state_dict,
)


def _meta_state(cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """Shapes of a full-size model without allocating it (ViT-bigG is 2.5B params)."""
    with torch.device("meta"):
        return dict(CLIP(cfg).state_dict())


@pytest.mark.parametrize("arch", architecture_names())
def test_infer_config_recovers_every_bundled_architecture(arch: str) -> None:
    cfg = get_config(arch)
    inferred = infer_config(_meta_state(cfg), quick_gelu=cfg.quick_gelu)
    assert inferred == cfg  # incl. head_width 80/88/104 of ViT-H/g/bigG and the name


def test_unbundled_shapes_use_width_over_64_heads(tiny_config: CLIPConfig) -> None:
    cfg = replace(tiny_config, text=replace(tiny_config.text, width=128, heads=2), name="custom")
    inferred = infer_config(_meta_state(cfg), quick_gelu=False)
    assert inferred.name == "custom" and inferred.text.heads == 2 and inferred.vision.heads == 1
    assert inferred == cfg.with_quick_gelu(False)


def test_infer_config_names_the_missing_key(tiny_model: CLIP) -> None:
    state = dict(tiny_model.state_dict())
    del state["ln_final.weight"]
    with pytest.raises(CheckpointError, match=r"'ln_final\.weight' is missing"):
        infer_config(state, quick_gelu=True, source="x.pt")


def test_missing_key_is_named(tiny_model: CLIP) -> None:
    state = dict(tiny_model.state_dict())
    del state["visual.ln_post.bias"]
    with pytest.raises(CheckpointError, match=r"x\.pt does not fit .*missing keys: visual\.ln_post\.bias"):
        check_state_dict(tiny_model, state, "x.pt")


def test_unexpected_key_is_named(tiny_model: CLIP) -> None:
    state = {**tiny_model.state_dict(), "logit_bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected keys: logit_bias"):
        check_state_dict(tiny_model, state, "x.pt")


def test_shape_mismatch_is_named(tiny_model: CLIP) -> None:
    state = {**tiny_model.state_dict(), "text_projection": torch.zeros(64, 16)}
    with pytest.raises(CheckpointError, match=r"text_projection: checkpoint \(64, 16\) vs model \(64, 32\)"):
        check_state_dict(tiny_model, state, "x.pt")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_float_tensor_is_named(tiny_model: CLIP, dtype: torch.dtype) -> None:
    state = {**tiny_model.state_dict(), "ln_final.bias": torch.zeros(64, dtype=dtype)}
    with pytest.raises(CheckpointError, match=r"dtype mismatches: ln_final\.bias: checkpoint torch\."):
        check_state_dict(tiny_model, state, "x.pt")


def test_nothing_is_copied_when_the_check_fails(tiny_config: CLIPConfig, tiny_model: CLIP) -> None:
    target = build_model(tiny_config)
    before = target.ln_final.weight.clone()
    state = {k: v + 1 for k, v in tiny_model.state_dict().items() if k != "visual.proj"}
    with pytest.raises(CheckpointError):
        load_into(target, state, "x.pt")
    assert torch.equal(target.ln_final.weight, before)


def test_long_key_lists_are_truncated(tiny_model: CLIP) -> None:
    with pytest.raises(CheckpointError, match=r"\(\+\d+ more\)"):
        check_state_dict(tiny_model, {}, "empty.pt")


def test_unwrap_training_checkpoint_and_openai_metadata(tiny_model: CLIP) -> None:
    inner = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    inner["input_resolution"] = torch.tensor(32)
    state = unwrap_state_dict({"epoch": 1, "state_dict": inner})
    assert set(state) == set(tiny_model.state_dict())


@pytest.mark.parametrize("obj", [[1, 2], {}, {"a": 1}])
def test_unwrap_rejects_non_state_dicts(obj: object) -> None:
    with pytest.raises(CheckpointError):
        unwrap_state_dict(obj)


def _hf_layer(prefix: str, width: int) -> dict[str, torch.Tensor]:
    keys = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        keys[f"{prefix}.self_attn.{proj}.weight"] = torch.randn(width, width)
        keys[f"{prefix}.self_attn.{proj}.bias"] = torch.randn(width)
    return keys


def test_hf_qkv_are_packed_in_order() -> None:
    state = _hf_layer("text_model.encoder.layers.0", 4)
    out = hf_to_openai(state)
    packed = out["transformer.resblocks.0.attn.in_proj_weight"]
    assert packed.shape == (12, 4)
    assert torch.equal(packed[4:8], state["text_model.encoder.layers.0.self_attn.k_proj.weight"])


def test_hf_missing_v_proj_is_named() -> None:
    state = _hf_layer("vision_model.encoder.layers.3", 4)
    del state["vision_model.encoder.layers.3.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"visual\.transformer\.resblocks\.3 lacks v_proj\.bias"):
        hf_to_openai(state)


def test_hf_unknown_key_is_named() -> None:
    with pytest.raises(CheckpointError, match=r"unexpected keys for a CLIPModel: vision_model\.head\.weight"):
        hf_to_openai({"vision_model.head.weight": torch.zeros(1)})


def test_hf_projection_is_transposed() -> None:
    w = torch.randn(8, 16)  # HF Linear: (D, W)
    assert torch.equal(hf_to_openai({"visual_projection.weight": w})["visual.proj"], w.t())


def test_config_from_hf_reads_heads_and_activation() -> None:
    hf = {
        "projection_dim": 1024,
        "text_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "hidden_act": "gelu",
        },
        "vision_config": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 16,
            "num_hidden_layers": 32,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
        },
    }
    cfg = config_from_hf(hf, name="ViT-H-14")
    assert cfg == get_config("ViT-H-14")


def test_config_from_hf_rejects_other_activations() -> None:
    hf = {"text_config": {"hidden_act": "relu"}, "vision_config": {"hidden_act": "relu"}}
    with pytest.raises(CheckpointError, match="unsupported activation"):
        config_from_hf(hf)


def test_open_clip_resnet_config_with_null_patch_size_is_the_bundled_one() -> None:
    """open_clip's RN50.json (also open_clip_config.json's model_cfg) says "patch_size": null."""
    open_clip_rn50 = {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }
    cfg = CLIPConfig.from_dict(open_clip_rn50, name="RN50").with_quick_gelu(True)
    assert cfg == get_config("RN50") and cfg.vision.patch_size == 32


def test_config_from_hf_fills_in_transformers_defaults() -> None:
    """A config.json may hold only the values that differ from transformers' defaults (ViT-B/32's
    sizes, 224 px, QuickGELU); transformers reads them back with those defaults, and so must we."""
    assert config_from_hf({"text_config": {}, "vision_config": {}}, name="ViT-B-32") == get_config("ViT-B-32")
    bigg = {  # what such a file holds for ViT-bigG-14: no image_size, context length or vocabulary
        "projection_dim": 1280,
        "text_config": {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                        "num_attention_heads": 20, "num_hidden_layers": 32},
        "vision_config": {"hidden_act": "gelu", "hidden_size": 1664, "intermediate_size": 8192,
                          "num_attention_heads": 16, "num_hidden_layers": 48, "patch_size": 14},
    }  # fmt: skip
    cfg = config_from_hf(bigg, name="ViT-bigG-14")
    assert infer_config(_meta_state(cfg), quick_gelu=False) == get_config("ViT-bigG-14")
    assert (cfg.vision.heads, cfg.text.heads, cfg.quick_gelu) == (16, 20, False)


def test_config_from_hf_lets_legacy_config_dict_win() -> None:
    """Older files may carry text_config_dict beside a stale text_config; like
    transformers, the _dict (completed with defaults) is what counts."""
    hf = {
        "projection_dim": 768,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "hidden_act": "gelu"},
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                               "num_hidden_layers": 24, "patch_size": 14},
    }  # fmt: skip
    assert config_from_hf(hf, name="ViT-L-14") == get_config("ViT-L-14")  # QuickGELU: the _dict's default
