"""FP8 (e4m3) matrix products for the transformer blocks: weights per output channel, activations per row.

Why: on Hopper (H100/H200) and Ada GPUs the FP8 tensor cores run at twice the bf16 rate, and a
ViT-B/32 image tower spends most of its time in the four linear layers of each block. What changes:
each of those layers stores its weight as float8_e4m3fn with one float32 scale per output channel,
and quantizes its input at run time with one scale per row (token), so an outlier token does not
crush the others' precision. `torch._scaled_mm` multiplies the two and rescales into bf16 (its
row-wise scaling mode; bf16 is the only output type CUDA allows for it).

What stays in bf16: embeddings, LayerNorms, attention (SDPA), the *last* block (its pooled row is
what the output is made of, and it costs 1/12 of the work) and the projections. The measured
deviation from fp32 is in docs/performance.md and checked by tests/backends/test_fp8.py.

`torch._scaled_mm` also runs on CPUs (a slow reference, used by the tests); the fast path is CUDA
with compute capability >= 8.9. Under torch.compile the per-row quantization fuses into the
preceding LayerNorm / GELU kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendError

__all__ = ["E4M3_MAX", "Fp8Linear", "check_fp8_device", "quantize_blocks_fp8", "to_fp8_rows"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_MIN_SCALE = 1e-12  # all-zero rows: any positive scale gives exact zeros


def to_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) float8_e4m3fn and (M, 1) float32 scales with x ~= q * scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=_MIN_SCALE) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W in e4m3 (per output channel) and x quantized per row at run time.

    Input and output are bf16 (any leading shape); in and out features must be multiples of 16
    (tensor-core tiles), which every CLIP width is.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise BackendError(f"fp8 needs layer sizes divisible by 16, got {out_features}x{in_features}")
        self.in_features, self.out_features = in_features, out_features
        with torch.no_grad():
            q, scale = to_fp8_rows(weight.detach())  # rows of W are output channels
        # _scaled_mm wants mat2 column-major: keep W (N, K) row-major and pass its transpose.
        self.register_buffer("weight_fp8", q.contiguous())
        self.register_buffer("weight_scale", scale.reshape(1, out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Fp8Linear:
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = to_fp8_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(
            q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
        )
        if self.bias is not None:
            y = y + self.bias  # separate add: fused by inductor, and the bias argument's rules vary
        return y.reshape(*lead, self.out_features)


class _Fp8Attention(nn.Module):
    """`MultiheadSelfAttention` with FP8 input and output projections (same maths otherwise)."""

    def __init__(self, attn: Any) -> None:
        super().__init__()
        self.heads = attn.heads
        self.in_proj = Fp8Linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = Fp8Linear.from_linear(attn.out_proj)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        projected: torch.Tensor = self.out_proj(out.transpose(1, 2).reshape(n, length, width))
        return projected


def quantize_blocks_fp8(blocks: nn.ModuleList, *, keep_last: bool = True) -> int:
    """Swap, in place, the linear layers of `blocks` (CLIP residual blocks) for FP8 ones.

    The module must already be bf16. The last block stays bf16 when `keep_last` (the pruned pooled
    row runs through it, see models/pooled.py). Returns how many blocks were converted.
    """
    todo: list[Any] = list(blocks)[:-1] if keep_last else list(blocks)
    for block in todo:
        block.attn = _Fp8Attention(block.attn)
        block.mlp.c_fc = Fp8Linear.from_linear(block.mlp.c_fc)
        block.mlp.c_proj = Fp8Linear.from_linear(block.mlp.c_proj)
    return len(todo)


def check_fp8_device(device: torch.device) -> None:
    """FP8 tensor cores need compute capability 8.9 (Ada) or 9.0+ (Hopper); CPUs run a slow reference."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise BackendError(
            f"precision 'fp8' needs an FP8 GPU (compute capability >= 8.9, e.g. L4, H100); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use fp16"
        )
