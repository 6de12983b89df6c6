"""CLIP towers that compute the last transformer block only for the row that is pooled.

Only the class token (image) or end-of-text token (text) of the last block reaches the output, so
that block computes queries, attention output, MLP and the final LayerNorm for that one row (keys
and values still for every token). Same arithmetic as `CLIP.encode_image` / `CLIP.encode_text`,
about 7% less work. Used by the PyTorch fast paths (`backends.accel`) and by the ONNX export, so
both run the same exact pruned graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, VisionTransformer

__all__ = ["PooledTextTower", "PooledVisionTransformer", "last_block_rows", "patch_embed_matmul"]


def last_block_rows(
    block: Any, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """A residual block evaluated for one query row per sample.

    x: (N, L, W) block input; rows: (N,) the row each sample keeps; mask: (N, 1, 1, L) additive or
    None. Returns (N, W): the block output at `rows`, equal to `block(x)[arange(N), rows]`.
    """
    n, length, width = x.shape
    attn: Any = block.attn
    heads = attn.heads
    h = block.ln_1(x)
    picked = torch.arange(n, device=x.device)
    x_row = x[picked, rows]  # (N, W)
    q = F.linear(h[picked, rows], attn.in_proj_weight[:width], attn.in_proj_bias[:width])
    kv = F.linear(h, attn.in_proj_weight[width:], attn.in_proj_bias[width:])  # (N, L, 2W)
    kv = kv.view(n, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # each (N, heads, L, W/heads)
    q = q.view(n, 1, heads, width // heads).transpose(1, 2)  # (N, heads, 1, W/heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, heads, 1, W/heads)
    # The MLP runs on (N, 1, W), not (N, W): same arithmetic, but OpenVINO 2026.4's CPU plugin
    # segfaults compiling a fixed-batch (N >= 3) graph with an erf-GELU residual MLP on 2-D rows.
    x_row = (x_row + attn.out_proj(out.reshape(n, width))).unsqueeze(1)  # (N, 1, W)
    return (x_row + block.mlp(block.ln_2(x_row))).squeeze(1)


def patch_embed_matmul(conv: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    """ViT patch embedding as one GEMM: (N, C, H, W) -> (N, grid_h * grid_w, width), the same sums
    as `conv` (kernel = stride = patch, no padding, no bias) in the same token order as
    `conv(x).flatten(2).transpose(1, 2)`.

    Why: for a 32x32 stride-32 convolution cuDNN picks an implicit-GEMM kernel without tensor
    cores (`precomputed_convolve_sgemm`); on an H200 it took 8.6 of the 27 ms of a batch-1024
    ViT-B/32 forward (benchmarks/gpu_profile.py), where the GEMM it amounts to,
    (N * 49, 3072) x (3072, 768), takes well under 1 ms.
    """
    patch = int(conv.kernel_size[0])
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels[:, :, : gh * patch, : gw * patch]  # a strided conv ignores the remainder rows / columns
    x = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)
    return F.linear(x, conv.weight.reshape(conv.weight.shape[0], -1))  # weight flattened as (C, kh, kw)


class PooledVisionTransformer(nn.Module):
    """The ViT image tower with the last block pruned to the class token; (N, 3, H, W) -> (N, D) float32.

    `patch_matmul=True` computes the patch embedding as a GEMM (`patch_embed_matmul`, what
    `accel.optimize` uses); the default keeps the convolution (the ONNX export's graph).
    """

    def __init__(self, visual: VisionTransformer, patch_matmul: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.patch_matmul = patch_matmul

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        pixels = pixels.to(v.conv1.weight.dtype)
        if self.patch_matmul:
            x = patch_embed_matmul(v.conv1, pixels)  # (N, grid*grid, W)
        else:
            x = v.conv1(pixels).flatten(2).transpose(1, 2)  # (N, W, grid, grid) -> (N, grid*grid, W)
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
        blocks = list(v.transformer.resblocks)
        for block in blocks[:-1]:
            x = block(x)
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = last_block_rows(blocks[-1], x, rows, None)  # (N, W) class token
        return (v.ln_post(x) @ v.proj).float()


class PooledTextTower(nn.Module):
    """(N, L) tokens + (N,) EOT positions -> (N, D) float32; last block optionally pruned to EOT.

    L may be shorter than the context length (exact truncation after the longest EOT: under the
    causal mask no later position changes an EOT state).
    """

    def __init__(self, model: CLIP, prune: bool = True) -> None:
        super().__init__()
        self.model = model
        self.prune = prune

    def forward(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        m = self.model
        length = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:length]  # (N, L, W)
        mask = m.attn_mask[:length, :length].to(x.dtype)
        blocks = list(m.transformer.resblocks)
        picked = torch.arange(x.shape[0], device=x.device)
        if self.prune:
            for block in blocks[:-1]:
                x = block(x, mask)
            row_mask = mask[eot].unsqueeze(1).unsqueeze(1)  # (N, 1, 1, L): EOT row of the causal mask
            pooled = last_block_rows(blocks[-1], x, eot, row_mask)
        else:
            for block in blocks:
                x = block(x, mask)
            pooled = x[picked, eot]
        return (m.ln_final(pooled) @ m.text_projection).float()
