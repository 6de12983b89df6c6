"""Random-weight checkpoints in every supported format, built once per session (no network).

Each fixture returns a `Checkpoint`: the file or folder, plus the independent reference model
(open_clip or transformers) that holds the same weights, for parity tests.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from clipengine.models.clip import CLIP, build_model

OPENAI_META = ("input_resolution", "context_length", "vocab_size")


@dataclass
class Checkpoint:
    path: Path  # file or folder to load
    reference: Any  # open_clip / transformers model with the same weights
    encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # normalised
    image_size: int


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def open_clip_encode(model: Any) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def encode(pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return _norm(model.encode_image(pixels)), _norm(model.encode_text(tokens))

    return encode


def hf_encode(model: Any) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def encode(pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(input_ids=tokens)
        img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
        txt = getattr(txt, "pooler_output", txt)
        return _norm(img), _norm(txt)

    return encode


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def _open_clip_model(name: str | None = None, *, quick_gelu: bool = False, seed: int = 0, **cfg: Any) -> Any:
    import open_clip

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name is not None:
            model = open_clip.create_model(name, pretrained=None)
        else:
            model = open_clip.model.CLIP(quick_gelu=quick_gelu, **cfg)
    _randomise_batchnorm(model)
    # A logit scale different from the init value, so tests notice if it is not copied.
    model.logit_scale.data.fill_(3.5)
    return model.eval()


class _OpenAIArchive(torch.nn.Module):
    """Same parameter layout as OpenAI's TorchScript releases: CLIP's modules plus 3 int buffers."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        cfg = clip.config
        meta = (cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size)
        for name, value in zip(OPENAI_META, meta, strict=True):
            self.register_buffer(name, torch.tensor(value))
        self._clip = [clip]  # a list, so the module is not registered twice

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._clip[0](pixels, tokens)


def save_openai_torchscript(clip: CLIP, path: Path) -> Path:
    """Trace `clip` into a TorchScript archive whose state_dict() has OpenAI's keys and metadata."""
    size = clip.config.vision.image_size
    tokens = torch.zeros(1, clip.config.text.context_length, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            _OpenAIArchive(clip), (torch.zeros(1, 3, size, size), tokens), check_trace=False
        )
    traced.save(str(path))
    return path


def save_openai_state_dict(clip: CLIP, path: Path) -> Path:
    """A plain OpenAI state dict (what `clip.load(jit=False)` models return) with the metadata ints."""
    state = dict(clip.state_dict())
    cfg = clip.config
    for name, value in zip(
        OPENAI_META, (cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size), strict=True
    ):
        state[name] = torch.tensor(value)
    torch.save(state, path)
    return path


def ours_from(reference: Any, cfg: Any) -> CLIP:
    model = build_model(cfg)
    model.load_state_dict(reference.state_dict())
    return model


# ----------------------------------------------------------------------------- small models

SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}
SMALL_VIT = {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8}
SMALL_RN = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def small_vit_open_clip(ckpt_dir: Path) -> Any:
    """open_clip CLIP, ViT tower, GELU, heads = width // 64 (inferable from shapes)."""
    return _open_clip_model(embed_dim=64, vision_cfg=SMALL_VIT, text_cfg=SMALL_TEXT, seed=1)


@pytest.fixture(scope="session")
def small_vit_bin(ckpt_dir: Path, small_vit_open_clip: Any) -> Checkpoint:
    path = ckpt_dir / "small_vit.bin"
    torch.save(small_vit_open_clip.state_dict(), path)
    return Checkpoint(path, small_vit_open_clip, open_clip_encode(small_vit_open_clip), 32)


@pytest.fixture(scope="session")
def small_vit_safetensors(ckpt_dir: Path, small_vit_open_clip: Any) -> Checkpoint:
    from safetensors.torch import save_file

    path = ckpt_dir / "small_vit.safetensors"
    save_file({k: v.contiguous() for k, v in small_vit_open_clip.state_dict().items()}, str(path))
    return Checkpoint(path, small_vit_open_clip, open_clip_encode(small_vit_open_clip), 32)


@pytest.fixture(scope="session")
def small_vit_training(ckpt_dir: Path, small_vit_open_clip: Any) -> Checkpoint:
    """open_clip training checkpoint: {"epoch", "name", "state_dict": {"module.<key>": ...}}."""
    path = ckpt_dir / "epoch_3.pt"
    state = {f"module.{k}": v for k, v in small_vit_open_clip.state_dict().items()}
    torch.save({"epoch": 3, "name": "small", "state_dict": state}, path)
    return Checkpoint(path, small_vit_open_clip, open_clip_encode(small_vit_open_clip), 32)


@pytest.fixture(scope="session")
def small_rn_open_clip() -> Any:
    """open_clip CLIP, ModifiedResNet tower, QuickGELU text (OpenAI-style)."""
    return _open_clip_model(embed_dim=64, vision_cfg=SMALL_RN, text_cfg=SMALL_TEXT, quick_gelu=True, seed=2)


def _small_rn_config() -> Any:
    from clipengine.models.config import CLIPConfig

    return CLIPConfig.from_dict({"embed_dim": 64, "vision": SMALL_RN, "text": SMALL_TEXT, "quick_gelu": True})


@pytest.fixture(scope="session")
def small_rn_torchscript(ckpt_dir: Path, small_rn_open_clip: Any) -> Checkpoint:
    path = save_openai_torchscript(
        ours_from(small_rn_open_clip, _small_rn_config()), ckpt_dir / "RN-small.pt"
    )
    return Checkpoint(path, small_rn_open_clip, open_clip_encode(small_rn_open_clip), 64)


@pytest.fixture(scope="session")
def small_rn_openai_state_dict(ckpt_dir: Path, small_rn_open_clip: Any) -> Checkpoint:
    path = save_openai_state_dict(ours_from(small_rn_open_clip, _small_rn_config()), ckpt_dir / "RN-sd.pt")
    return Checkpoint(path, small_rn_open_clip, open_clip_encode(small_rn_open_clip), 64)


def _hf_model(seed: int, **overrides: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**overrides)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        # HF initialises class embedding / biases to tiny values; spread them so a wrong key map shows.
        for name, param in model.named_parameters():
            if name.endswith("bias") or "class_embedding" in name:
                param.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="session")
def small_hf_folder(ckpt_dir: Path) -> Checkpoint:
    """transformers CLIPModel (GELU, 4 text heads of 32: not width // 64) saved as pytorch_model.bin."""
    model = _hf_model(
        3,
        text_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "hidden_act": "gelu",
        },
        vision_config={
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_attention_heads": 3,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "gelu",
        },
        projection_dim=48,
    )
    folder = ckpt_dir / "hf-small"
    model.save_pretrained(folder, safe_serialization=False)
    (folder / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], '
        '"image_std": [0.5, 0.5, 0.5], "resample": 2, "size": {"shortest_edge": 32}}'
    )
    return Checkpoint(folder, model, hf_encode(model), 32)


# ----------------------------------------------------------------------------- full-size models
# One test each: function-scoped, and their files deleted after it, so the suite never holds the
# four 0.4-0.6 GB checkpoints (and their reference models' memory) at once.


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def full_vit_b32_hf(full_dir: Path) -> Checkpoint:
    """transformers CLIPModel with its default config: exactly ViT-B/32 (151M params), QuickGELU."""
    model = _hf_model(4)
    folder = full_dir / "hf-vit-b-32"
    model.save_pretrained(folder)  # model.safetensors
    return Checkpoint(folder, model, hf_encode(model), 224)


@pytest.fixture
def full_vit_b32_open_clip(full_dir: Path) -> Checkpoint:
    """open_clip ViT-B-32 (GELU, as the LAION weights) saved as open_clip_model.safetensors."""
    from safetensors.torch import save_file

    model = _open_clip_model("ViT-B-32", seed=5)
    path = full_dir / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Checkpoint(path, model, open_clip_encode(model), 224)


@pytest.fixture
def full_vit_b32_torchscript(full_dir: Path) -> Checkpoint:
    """An OpenAI-style ViT-B-32.pt TorchScript archive; reference: open_clip ViT-B-32-quickgelu."""
    from clipengine.models.config import get_config

    model = _open_clip_model("ViT-B-32-quickgelu", seed=6)
    path = save_openai_torchscript(ours_from(model, get_config("ViT-B-32")), full_dir / "ViT-B-32.pt")
    return Checkpoint(path, model, open_clip_encode(model), 224)


@pytest.fixture
def full_rn50_open_clip(full_dir: Path) -> Checkpoint:
    """open_clip RN50-quickgelu (102M params) as a plain .bin state dict."""
    model = _open_clip_model("RN50-quickgelu", seed=7)
    path = full_dir / "rn50.bin"
    torch.save(model.state_dict(), path)
    return Checkpoint(path, model, open_clip_encode(model), 224)
