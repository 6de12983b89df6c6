"""The torch graphs exported per tower and the `torch.onnx.export` call that writes one ONNX file.

Separate from `export.onnx` (which runs the whole export: precisions, verification, the folder) so
the graph recipe - what each tower computes, its example inputs and dynamic axes - reads on its own.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). On torch 2.13 the
legacy TorchScript exporter still works but is deprecated and gives ~1.7x more nodes (Shape /
Gather / Constant chains for every view); the dynamo graphs are clean, static shapes stay static,
and `Dim("batch")` gives a real symbolic batch axis. EOT pooling is exported as Cast(int32) ->
ArgMax -> GatherND: ArgMax never sees int64 (unsupported by ORT's CUDA and TensorRT providers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.clip import VisionTransformer
from ..models.pooled import PooledTextTower, PooledVisionTransformer
from . import quantize
from .manifest import TensorSpec

if TYPE_CHECKING:
    from ..models.clip import CLIP

__all__ = ["OPSET", "export_graph", "tensor_specs"]

OPSET = 18  # LayerNormalization (17+) as one op; supported by ORT >= 1.14 and TensorRT 8.6+
_DYNAMIC_EXAMPLE_BATCH = 2  # example rows for dynamic export (1 would specialise the axis)


class _ImageGraph(nn.Module):
    """(N, 3, H, W) float32 pixels -> (N, D) unnormalised image features.

    ViT towers export with the last block pruned to the class token (exact, ~7% fewer FLOPs in
    every runtime); ResNet towers as they are.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model
        self.pooled = (
            PooledVisionTransformer(model.visual) if isinstance(model.visual, VisionTransformer) else None
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = (
            self.pooled(pixels) if self.pooled is not None else self.model.encode_image(pixels)
        )
        return features


class _TextGraph(nn.Module):
    """(N, L) int64 tokens -> (N, D) features (last block pruned to the EOT row, exact), or
    (N, L, W) token states when split."""

    def __init__(self, model: CLIP, split: bool) -> None:
        super().__init__()
        self.model, self.split = model, split
        self.pooled = PooledTextTower(model, prune=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.split:
            return self.model.encode_text_tokens(tokens)
        # EOT has the highest id; argmax over int32 keeps ORT's CUDA / TensorRT providers happy.
        eot = tokens.to(torch.int32).argmax(dim=-1)
        features: torch.Tensor = self.pooled(tokens, eot)
        return features


def export_graph(model: CLIP, tower: str, batch: int | None, split: bool, path: Path) -> str | None:
    """torch.onnx.export one tower to `path`; returns the external-data file name (models > 2 GB)."""
    cfg = model.config
    rows = batch or _DYNAMIC_EXAMPLE_BATCH
    if tower == "image":
        graph: nn.Module = _ImageGraph(model)
        size = cfg.vision.image_size
        example = torch.zeros(rows, 3, size, size)
        names = (["pixels"], ["embeddings"])
    else:
        graph = _TextGraph(model, split)
        example = torch.zeros(rows, cfg.text.context_length, dtype=torch.int64)
        example[:, 0], example[:, 1] = 49406, 49407  # SOT, EOT
        names = (["tokens"], ["token_states" if split else "embeddings"])
    dynamic: tuple[dict[int, Any], ...] | None = None
    if batch is None:  # dynamic batch; text also a dynamic length, so runtimes can stop after the last EOT
        axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
        if tower == "text":
            axes[1] = torch.export.Dim("length", min=2, max=cfg.text.context_length)
        dynamic = (axes,)
    with warnings.catch_warnings():
        # torch 2.13's own exporter trips its own deprecation (torch.utils._pytree's LeafSpec) once
        # per graph: noise for the user, nothing they could act on.
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
        )
        program = torch.onnx.export(
            graph.eval(),
            (example,),
            None,
            input_names=names[0],
            output_names=names[1],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
            optimize=True,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    return quantize.save_onnx(program.model_proto, path)


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of the ONNX file at `path`, as the manifest records them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dtypes = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.INT64: "int64",
        onnx.TensorProto.FLOAT16: "float16",
    }

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(name=v.name, shape=shape, dtype=dtypes.get(t.elem_type, str(t.elem_type)))

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]
