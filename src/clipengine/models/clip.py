"""The CLIP nn.Module: ViT or ModifiedResNet image tower, causal text transformer, shared embedding.

Submodule and parameter names equal OpenAI's checkpoint keys (`visual.transformer.resblocks.0.ln_1`,
`attn.in_proj_weight`, ...), so converting an OpenAI or open_clip state dict is a plain load.
Attention runs through `F.scaled_dot_product_attention` so PyTorch picks fused kernels (flash /
memory-efficient on CUDA, oneDNN on CPU) and the ONNX exporter sees one clean op sequence.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig

__all__ = ["CLIP", "build_model", "causal_mask"]


def causal_mask(length: int) -> torch.Tensor:
    """(L, L) additive causal mask: 0 on/below the diagonal, -1e4 above.

    A finite value (not -inf) keeps FP16/BF16 graphs free of inf - inf = NaN.
    """
    mask = torch.full((length, length), -1e4)
    # On the meta device (`models.load` rebuilds the mask on a real one) triu_'s meta decomposition
    # would import torch._dynamo (see `_init_randn`); a meta tensor has no values to mask anyway.
    return mask if mask.is_meta else mask.triu_(1)


def _init_randn(*shape: int, times: float = 1.0, over: float = 1.0) -> torch.Tensor:
    """torch.randn(shape) * times / over, CLIP's random init; on the meta device an empty tensor.

    `models.load` builds the model on the meta device and then assigns the checkpoint's tensors.
    There, randn's meta path imports sympy, and `*`, normal_ and triu_ go through decompositions
    that import torch._dynamo: 1.0-1.6 s of every model load (session 15), for values never kept.
    """
    empty = torch.empty(shape)
    if empty.is_meta:
        return empty
    values = torch.randn(shape)
    if times != 1.0:
        values.mul_(times)  # scale * randn(...) as before: the same products
    if over != 1.0:
        values.div_(over)
    return values


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (packed in_proj) but batch-first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = x.shape  # (N, L, W)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, L, W/heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(n, length, width)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_width, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.input_resolution = cfg.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(_init_randn(width, times=scale))
        self.positional_embedding = nn.Parameter(_init_randn(grid * grid + 1, width, times=scale))
        self.ln_pre = nn.LayerNorm(width)
        if not isinstance(cfg.layers, int):
            raise TypeError("VisionTransformer needs an int depth; a 4-tuple means ModifiedResNet")
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(_init_randn(width, output_dim, times=scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, W, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj  # (N, D)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased (avg-pool) strides, as in CLIP's ModifiedResNet."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a (N, C, h, w) map to (N, D): one attention query (the mean token) over all positions."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            _init_randn(spacial_dim**2 + 1, embed_dim, over=embed_dim**0.5)
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (N, hw+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        n, length, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.q_proj(x[:, :1]).view(n, 1, h, d).transpose(1, 2)
        k = self.k_proj(x).view(n, length, h, d).transpose(1, 2)
        v = self.v_proj(x).view(n, length, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, 1, d)
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem, avg-pool downsampling, attention pooling instead of global avg."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        assert isinstance(cfg.layers, tuple)  # guaranteed by VisionConfig.is_resnet
        width = cfg.width
        self.input_resolution = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class CLIP(nn.Module):
    """Both towers plus the learned temperature. encode_* return *unnormalised* (N, D) features."""

    attn_mask: torch.Tensor  # (L, L) additive causal mask, a non-persistent buffer

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.vision.is_resnet:
            self.visual: nn.Module = ModifiedResNet(cfg.vision, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        t: TextConfig = cfg.text
        self.context_length = t.context_length
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_width, cfg.quick_gelu)
        # nn.Embedding's own init (normal_), skipped on the meta device (see `_init_randn`).
        token_weight = torch.empty(t.vocab_size, t.width)
        if not token_weight.is_meta:
            nn.init.normal_(token_weight)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width, _weight=token_weight)
        self.positional_embedding = nn.Parameter(_init_randn(t.context_length, t.width, times=0.01))
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(_init_randn(t.width, cfg.embed_dim, times=t.width**-0.5))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(1/0.01), OpenAI's init
        self.register_buffer("attn_mask", causal_mask(t.context_length), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D)."""
        return self.visual(pixels.to(self.dtype))

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, W) final-layer token states after ln_final (before pooling)."""
        length = tokens.shape[1]  # <= context_length: a batch truncated after its last EOT is exact
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x, self.attn_mask[:length, :length].to(x.dtype))
        return self.ln_final(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, D), pooled at each text's end-of-text token (its highest id)."""
        states = self.encode_text_tokens(tokens)
        # The EOT token has the largest id in the vocabulary, so argmax finds it; argmax over int32
        # (not int64) keeps ONNX Runtime's CPU/CUDA/TensorRT providers happy.
        eot = tokens.to(torch.int32).argmax(dim=-1)
        pooled = states[torch.arange(states.shape[0], device=states.device), eot]
        return pooled @ self.text_projection

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (image_features, text_features, logit_scale.exp()), features unnormalised."""
        return self.encode_image(pixels), self.encode_text(tokens), self.logit_scale.exp()


def build_model(cfg: CLIPConfig) -> CLIP:
    """A randomly initialised CLIP in eval mode for `cfg` (load weights with models.load)."""
    return CLIP(cfg).eval()
