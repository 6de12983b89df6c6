"""Parity helpers: run clipengine and a reference model on the same inputs, compare normalised embeddings."""

from __future__ import annotations

import pytest
import torch

from clipengine.models.load import LoadedModel, load_model
from clipengine.text.tokenizer import tokenize

from .conftest import Checkpoint

TEXTS = ["a photo of a cat", "a diagram of a neural network", "", "A DOG 🐕 running, fast!"]
FP32_BOUND = 1e-4  # max-abs difference of L2-normalised embeddings


def max_abs_errors(
    ckpt: Checkpoint, loaded: LoadedModel | None = None, **load_kwargs: object
) -> tuple[float, float]:
    loaded = loaded or load_model(ckpt.path, **load_kwargs)  # type: ignore[arg-type]
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, ckpt.image_size, ckpt.image_size)
    tokens = torch.from_numpy(tokenize(TEXTS, context_length=loaded.config.text.context_length))
    ref_img, ref_txt = ckpt.encode(pixels, tokens)
    with torch.no_grad():
        img = loaded.module.encode_image(pixels)
        txt = loaded.module.encode_text(tokens)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    logit_ref = float(ckpt.reference.logit_scale.detach())
    assert float(loaded.module.logit_scale.detach()) == pytest.approx(logit_ref)
    return float((img - ref_img).abs().max()), float((txt - ref_txt).abs().max())


def assert_parity(ckpt: Checkpoint, loaded: LoadedModel | None = None, **load_kwargs: object) -> None:
    img_err, txt_err = max_abs_errors(ckpt, loaded, **load_kwargs)
    assert img_err <= FP32_BOUND and txt_err <= FP32_BOUND, (img_err, txt_err)
