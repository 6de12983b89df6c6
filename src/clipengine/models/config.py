"""Architecture configs: one frozen dataclass per tower, read from configs/*.json or inferred from shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from importlib import resources
from typing import Any

from ..errors import UnknownModelError
from .spec import did_you_mean

__all__ = [
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "architecture_names",
    "config_problems",
    "get_config",
]


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224  # input H == W
    layers: int | tuple[int, int, int, int] = 12  # int: ViT depth; 4-tuple: ModifiedResNet stage depths
    width: int = 768  # ViT: token width; ResNet: stem width (stage-1 planes)
    patch_size: int = 32  # ViT only
    head_width: int = 64  # channels per attention head (ViT-H/g/bigG use 80/88/104)
    mlp_ratio: float = 4.0  # ViT MLP hidden = int(width * mlp_ratio)

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # ResNet attention pool runs on width*32 channels with width*32/64 heads (OpenAI's choice).
        return self.width * 32 // 64 if self.is_resnet else self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77  # L: tokens per text, including start/end
    vocab_size: int = 49408  # CLIP BPE vocabulary incl. <|startoftext|>, <|endoftext|>
    width: int = 512  # token width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer depth
    mlp_ratio: float = 4.0  # MLP hidden = int(width * mlp_ratio)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int  # D: shared embedding size
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False  # OpenAI weights were trained with QuickGELU, most LAION ones with GELU
    name: str = "custom"  # architecture name, e.g. "ViT-B-32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.vision.layers, tuple):
            d["vision"]["layers"] = list(self.vision.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str | None = None) -> CLIPConfig:
        """Accept our own to_dict() form or open_clip's model_configs form (vision_cfg/text_cfg)."""
        vis = dict(d.get("vision") or d.get("vision_cfg") or {})
        txt = dict(d.get("text") or d.get("text_cfg") or {})
        if isinstance(vis.get("layers"), list):
            vis["layers"] = tuple(vis["layers"])
        vis_fields = set(VisionConfig.__dataclass_fields__)
        txt_fields = set(TextConfig.__dataclass_fields__)
        # null means "not set": open_clip's ResNet configs carry "patch_size": null, which must keep
        # our default rather than put None in an int field (and differ from the bundled config).
        return cls(
            embed_dim=int(d["embed_dim"]),
            vision=VisionConfig(**{k: v for k, v in vis.items() if k in vis_fields and v is not None}),
            text=TextConfig(**{k: v for k, v in txt.items() if k in txt_fields and v is not None}),
            # As read, not bool(): "false" (a string) was True; `config_problems` names a non-bool.
            quick_gelu=False if d.get("quick_gelu") is None else d["quick_gelu"],
            name=name or d.get("name", "custom"),
        )

    def with_quick_gelu(self, quick_gelu: bool) -> CLIPConfig:
        return replace(self, quick_gelu=quick_gelu)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def config_problems(cfg: CLIPConfig) -> list[str]:
    """What keeps CLIP(cfg) from being built and run; empty when nothing does.

    Configs read from files (a hand-edited config.json) are user input. CLIP's constructor fails on
    bad values with a TypeError or ZeroDivisionError deep in a layer, and heads that do not divide
    a width pass it and fail at the first forward with a reshape error: neither names the setting.
    """
    problems: list[str] = []

    def positive_int(where: str, value: object) -> None:
        if not _is_positive_int(value):
            problems.append(f"{where} must be a positive integer, got {value!r}")

    v, t = cfg.vision, cfg.text
    if not isinstance(cfg.quick_gelu, bool):
        problems.append(f"quick_gelu must be true or false, got {cfg.quick_gelu!r}")
    positive_int("embed_dim", cfg.embed_dim)
    positive_int("vision.image_size", v.image_size)
    positive_int("vision.width", v.width)
    if isinstance(v.layers, tuple):
        if len(v.layers) != 4 or not all(_is_positive_int(n) for n in v.layers):
            problems.append(f"vision.layers must be one depth (ViT) or 4 (ModifiedResNet), got {list(v.layers)}")
    else:
        positive_int("vision.layers", v.layers)
        positive_int("vision.patch_size", v.patch_size)
        positive_int("vision.head_width", v.head_width)
        if not _is_positive_number(v.mlp_ratio):
            problems.append(f"vision.mlp_ratio must be a positive number, got {v.mlp_ratio!r}")
    for name in ("context_length", "vocab_size", "width", "heads", "layers"):
        positive_int(f"text.{name}", getattr(t, name))
    if not _is_positive_number(t.mlp_ratio):
        problems.append(f"text.mlp_ratio must be a positive number, got {t.mlp_ratio!r}")
    if problems:  # the checks below divide by these values
        return problems
    vision_width = v.width * 32 if v.is_resnet else v.width  # the ResNet's attention pool runs at width*32
    for tower, width, heads in (("vision", vision_width, v.heads), ("text", t.width, t.heads)):
        if heads < 1 or width % heads:
            problems.append(f"{tower}: {heads} heads do not divide its width {width}")
    return problems


_CONFIG_PACKAGE = "clipengine.models.configs"
_cache: dict[str, CLIPConfig] = {}


def architecture_names() -> list[str]:
    """Names of the bundled architecture configs, sorted."""
    files = resources.files(_CONFIG_PACKAGE).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def get_config(name: str) -> CLIPConfig:
    """Load the bundled config for an architecture name such as "ViT-B-32" or "RN50".

    Raises:
        UnknownModelError: the name is not bundled; the message lists the valid names.
    """
    if name not in _cache:
        path = resources.files(_CONFIG_PACKAGE) / f"{name}.json"
        if not path.is_file():
            raise UnknownModelError(
                f"unknown architecture {name!r}{did_you_mean(name, architecture_names())}; "
                f"available: {', '.join(architecture_names())}"
            )
        _cache[name] = CLIPConfig.from_dict(json.loads(path.read_text()), name=name)
    return _cache[name]
