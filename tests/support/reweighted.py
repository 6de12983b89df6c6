"""A copy of a test CLIP with other weights: the same architecture and names, other embeddings
(for re-exports of "other weights" into one folder)."""

from __future__ import annotations

import copy
from typing import Any


def reweighted(model: Any, seed: int) -> Any:
    """A deep copy of `model` with every parameter moved by seeded noise (0.05 std)."""
    import torch

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return other
