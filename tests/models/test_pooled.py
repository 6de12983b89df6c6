"""The pruned towers (last block computed for the pooled row only) equal the full model."""

from __future__ import annotations

import torch

from clipengine.models.pooled import PooledTextTower, PooledVisionTransformer


def test_pooled_image_tower_equals_encode_image(tiny_model):  # type: ignore[no-untyped-def]
    pixels = torch.randn(5, 3, tiny_model.config.vision.image_size, tiny_model.config.vision.image_size)
    with torch.no_grad():
        full = tiny_model.encode_image(pixels)
        pooled = PooledVisionTransformer(tiny_model.visual)(pixels)
    assert pooled.shape == full.shape
    assert torch.allclose(pooled, full, atol=1e-5, rtol=1e-5)


def test_pooled_text_tower_equals_encode_text_at_any_length(tiny_model):  # type: ignore[no-untyped-def]
    length = tiny_model.config.text.context_length
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49000, (4, length), generator=gen)
    tokens[:, 0] = 49406
    ends = torch.tensor([1, 3, 5, length - 1])
    tokens[torch.arange(4), ends] = 49407  # EOT, then junk after it that must not matter
    with torch.no_grad():
        full = tiny_model.encode_text(tokens)
        for prune in (True, False):
            tower = PooledTextTower(tiny_model, prune=prune)
            assert torch.allclose(tower(tokens, ends), full, atol=1e-5, rtol=1e-5)
        short = PooledTextTower(tiny_model)(tokens[:2, :6], ends[:2])  # truncated after the longest EOT
    assert torch.allclose(short, full[:2], atol=1e-5, rtol=1e-5)
