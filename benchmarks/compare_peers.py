"""Side-by-side speed of clipengine's fast paths vs open_clip, Hugging Face, ONNX Runtime and OpenVINO (one run).

Every contestant gets the *same* random ViT-B/32 (OpenAI architecture, QuickGELU) weights: open_clip's
`ViT-B-32-quickgelu` random init, copied into clipengine's CLIP (same key names) and into a Hugging
Face `CLIPModel` (key map below); ONNX graphs are exported from the clipengine fp32 module in this run
(peers: the plain graph; clipengine: a `clipengine export` folder, run by its OpenVINO backend).
Measurements are interleaved (round-robin over contestants, several rounds) so that load from other
processes hits everyone alike; the table shows the median throughput and the median over rounds of
the ratio to the best *peer* in the same round, plus the minimum cosine to open_clip fp32.

Usage:
    python benchmarks/compare_peers.py [--quick] [--rounds 5] [--skip-onnx] [--skip-openvino] [--skip-e2e] [--no-compile] [--json out.json]
    python benchmarks/compare_peers.py --device cuda --skip-e2e   # fp16 / fp8, CUDA graphs, compile; image batch 1024 added
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
COSINE_BOUND = 0.999  # fidelity bound of a fast path vs fp32 (the export issue's bound)
_KEEP: list[object] = []
FP8_UNSUPPORTED: list[str] = []  # set by main(): this GPU has no FP8 tensor cores


def _patch_torchvision_ops() -> None:
    """Same as tests/conftest.py: this torchvision build cannot load its C++ ops beside CPU torch;
    declaring the two op schemas lets open_clip / transformers import it (nms is never called)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        torch.ops.load_library(str(Path(importlib.util.find_spec("torchvision").origin).parent / "_C.so"))  # type: ignore[arg-type]
        return
    except (OSError, RuntimeError):
        pass
    try:
        torch.ops.torchvision.nms  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


_patch_torchvision_ops()

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clipengine.backends.accel import optimize  # noqa: E402
from clipengine.models.clip import CLIP, build_model  # noqa: E402
from clipengine.models.config import get_config  # noqa: E402

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Contestant:
    name: str
    peer: bool  # True: a peer; False: clipengine
    fn: Fn
    precision: str
    times: list[float] = field(default_factory=list)  # items/s per round
    cosine: float = float("nan")


# ----------------------------------------------------------------------------- models


def build_models(device: str) -> tuple[Any, CLIP, Any]:
    """open_clip random ViT-B-32-quickgelu, and the same weights in clipengine's CLIP and HF CLIPModel."""
    torch.manual_seed(SEED)
    try:
        import open_clip
    except ImportError:  # e.g. the GPU machine's image: HF transformers is then the reference peer
        oc = None
        ours = build_model(get_config("ViT-B-32"))
        state = {k: v for k, v in ours.state_dict().items() if k != "attn_mask"}
    else:
        oc = open_clip.create_model("ViT-B-32-quickgelu").eval()
        state = {k: v for k, v in oc.state_dict().items() if k != "attn_mask"}
        ours = build_model(get_config("ViT-B-32"))
        missing, unexpected = ours.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"open_clip -> clipengine key mismatch: missing={missing} unexpected={unexpected}")
    hf = _to_hf(state)
    if oc is None and hf is None:
        raise SystemExit("compare_peers needs open_clip or transformers installed for its peers")
    return (oc.to(device) if oc is not None else None), ours.to(device), (hf.to(device) if hf is not None else None)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of SHA-256 over every parameter and buffer, in state-dict order."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _to_hf(state: dict[str, torch.Tensor]) -> Any:
    """OpenAI-named state dict -> transformers CLIPModel (quick_gelu, same shapes), every key checked."""
    try:
        from transformers import CLIPConfig as HFConfig
        from transformers import CLIPModel
    except ImportError:
        return None
    vis = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32, hidden_act="quick_gelu", projection_dim=512)  # fmt: skip
    txt = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=512,
               eos_token_id=49407)  # fmt: skip
    cfg = HFConfig(text_config=txt, vision_config=vis, projection_dim=512)
    hf = CLIPModel(cfg).eval()
    out: dict[str, torch.Tensor] = {
        "logit_scale": state["logit_scale"],
        "text_projection.weight": state["text_projection"].t(),
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
    }
    for src, dst in (("transformer", "text_model.encoder"), ("visual.transformer", "vision_model.encoder")):
        i = 0
        while f"{src}.resblocks.{i}.ln_1.weight" in state:
            s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            for p in ("weight", "bias"):
                for j, qkv in enumerate(state[f"{s}.attn.in_proj_{p}"].chunk(3)):
                    out[f"{d}.self_attn.{'qkv'[j]}_proj.{p}"] = qkv
                out[f"{d}.self_attn.out_proj.{p}"] = state[f"{s}.attn.out_proj.{p}"]
                out[f"{d}.layer_norm1.{p}"] = state[f"{s}.ln_1.{p}"]
                out[f"{d}.layer_norm2.{p}"] = state[f"{s}.ln_2.{p}"]
                out[f"{d}.mlp.fc1.{p}"] = state[f"{s}.mlp.c_fc.{p}"]
                out[f"{d}.mlp.fc2.{p}"] = state[f"{s}.mlp.c_proj.{p}"]
            i += 1
    target = hf.state_dict()
    missing = sorted(k for k in target if k not in out and not k.endswith("position_ids"))
    bad = sorted(k for k, v in out.items() if k not in target or target[k].shape != v.shape)
    if missing or bad:
        raise SystemExit(f"clipengine -> HF key map: missing={missing[:5]} bad={bad[:5]}")
    hf.load_state_dict(out, strict=False)
    return hf


# Low precision under test: bf16 on CPU, fp16 on CUDA (main() switches it with --device).
LOW: dict[str, Any] = {"dtype": torch.bfloat16, "name": "bf16", "device": "cpu"}


def bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    # Weights cast, requires_grad left True: bf16 + requires_grad=False is a slow CPU path (pytorch#151934).
    return copy.deepcopy(module).to(LOW["dtype"])


# ----------------------------------------------------------------------------- contestants


def _no_grad(fn: Fn) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x).float()

    return run


def _hf_fn(method: Callable[..., Any], arg: str, dtype: torch.dtype) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        out = method(**{arg: x.to(dtype) if x.is_floating_point() else x})
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return _no_grad(run)


def _compiled(fn: Fn) -> Fn:
    # What a torch user does for inference: freezing via the global inductor flag (main() sets it;
    # torch.compile(options={"freezing": True}) silently does not freeze in torch 2.13).
    return torch.compile(fn, dynamic=False)


def peers(tower: str, oc: Any, hf: Any, onnx_sessions: dict[str, Any], *, compile_peers: bool) -> list[Contestant]:
    """fp32 / low-precision eager and compiled open_clip, HF fp32 / low, ORT fp32 / int8 for `tower`."""
    image = tower == "image"
    low, lname = LOW["dtype"], LOW["name"]
    method = "encode_image" if image else "encode_text"
    out: list[Contestant] = []  # the first one (fp32) is every case's cosine reference
    if oc is not None:
        oc16 = bf16_copy(oc)
        out.append(Contestant("open_clip eager fp32", True, _no_grad(getattr(oc, method)), "fp32"))
        eager_low = _no_grad(lambda x: getattr(oc16, method)(x.to(low) if image else x))
        out.append(Contestant(f"open_clip eager {lname}", True, eager_low, lname))
        if LOW["device"] == "cuda":  # the batch-1 peer: the eager model captured in a CUDA graph
            from clipengine.backends.accel import _CudaGraphs

            graphed = _CudaGraphs(_no_grad(lambda x: getattr(oc16, method)(x.to(low) if image else x)))
            out.append(Contestant(f"open_clip eager {lname} + CUDA graph", True, graphed, lname))
        if compile_peers:
            inner = _compiled(lambda x: getattr(oc16, method)(x.to(low) if image else x))
            out.append(Contestant(f"open_clip compile {lname}", True, _no_grad(inner), lname))
    if hf is not None:
        hf16 = bf16_copy(hf)
        hm, arg = ("get_image_features", "pixel_values") if image else ("get_text_features", "input_ids")
        out.append(Contestant("HF transformers fp32", True, _hf_fn(getattr(hf, hm), arg, torch.float32), "fp32"))
        out.append(Contestant(f"HF transformers {lname}", True, _hf_fn(getattr(hf16, hm), arg, low), lname))
        if oc is None and compile_peers:  # keep one compiled peer without open_clip
            out.append(Contestant(f"HF transformers compile {lname}", True,
                                  _compiled(_hf_fn(getattr(hf16, hm), arg, low)), lname))  # fmt: skip
    for prec, sess in onnx_sessions.get(tower, {}).items():
        out.append(Contestant(f"ONNX Runtime {prec}", True, _ort_fn(sess), prec))
    for name, (fn, prec) in OPENVINO.get("peers", {}).get(tower, {}).items():
        out.append(Contestant(name, True, fn, prec))
    return out


def ours(tower: str, model: CLIP, *, quick: bool, compile_ours: bool = True, autotune: bool = False,
         skip_fp8: bool = False) -> list[Contestant]:  # fmt: skip
    """clipengine fast paths (accel.optimize) for `tower`."""
    lname = LOW["name"]
    variants: list[tuple[str, dict[str, Any]]] = [
        (f"clipengine eager {lname}", dict(precision=lname, compile=False)),
        (f"clipengine compile {lname}", dict(precision=lname, compile=True)),
    ]
    if LOW["device"] == "cuda":
        # CUDA graphs on every variant: at batch 1-32 kernel launches, not maths, set the pace.
        variants = [
            (f"clipengine eager {lname} + CUDA graphs", dict(precision=lname, cuda_graphs=True)),
            ("clipengine eager fp8 + CUDA graphs", dict(precision="fp8", cuda_graphs=True)),
        ]
        if compile_ours:
            variants += [
                (f"clipengine compile {lname} + CUDA graphs", dict(precision=lname, compile=True, cuda_graphs=True)),
                ("clipengine compile fp8 + CUDA graphs", dict(precision="fp8", compile=True, cuda_graphs=True)),
            ]
        if FP8_UNSUPPORTED or skip_fp8:
            variants = [v for v in variants if v[1]["precision"] != "fp8"]
    elif not quick:
        variants.insert(1, (f"clipengine compile {lname} (no prune/trunc)", dict(precision=lname, compile=True, prune=False, truncate_text=False)))  # fmt: skip
    if not compile_ours:
        variants = [v for v in variants if not v[1].get("compile")]
    if autotune and LOW["device"] == "cuda":  # Triton GEMMs with fused epilogues: fewer kernels at batch 1
        variants.append((f"clipengine compile max-autotune {lname} + CUDA graphs",
                         dict(precision=lname, compile="max-autotune-no-cudagraphs", cuda_graphs=True)))  # fmt: skip
    out = []
    for name, kw in variants:
        fast = optimize(model, device=LOW["device"], **kw)
        fn = fast.encode_image if tower == "image" else fast.encode_text
        out.append(Contestant(name, False, fn, kw["precision"]))
    for name, (fn, prec) in OPENVINO.get("ours", {}).get(tower, {}).items():
        out.append(Contestant(name, False, fn, prec))
    return out


# ----------------------------------------------------------------------------- ONNX Runtime


class _ImageGraph(torch.nn.Module):
    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextGraph(_ImageGraph):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model.encode_text(tokens)


def onnx_sessions(model: CLIP, workdir: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Export both towers (fp32, dynamic batch), quantize_dynamic to int8, open ORT CPU sessions."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    result: dict[str, dict[str, Any]] = {}
    for tower, graph, example, name in (
        ("image", _ImageGraph(model), torch.randn(2, 3, 224, 224), "pixels"),
        ("text", _TextGraph(model), torch.randint(1, 49407, (2, 77)), "tokens"),
    ):
        fp32 = workdir / f"{tower}_fp32.onnx"
        int8 = workdir / f"{tower}_int8.onnx"
        if not fp32.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph.eval(), (example,), str(fp32), input_names=[name], output_names=["features"],
                                  dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                                  dynamo=False)  # fmt: skip
        if not int8.exists():
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        result[tower] = {
            p: ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
            for p, f in (("fp32", fp32), ("int8 dynamic", int8))
        }
    return result


# ----------------------------------------------------------------------------- OpenVINO

# Filled by openvino_contestants(): {"peers"|"ours": {tower: {name: (fn, precision)}}}.
OPENVINO: dict[str, dict[str, dict[str, tuple[Fn, str]]]] = {}
OPENVINO_EXPORT: dict[str, Path] = {}  # "folder": the clipengine export folder (fp32 + static int8)


def openvino_contestants(model: CLIP, onnx_dir: Path, workdir: Path, threads: int, log: Callable[[str], None]) -> None:
    """Raw OpenVINO peers on the plain fp32 graphs (f32, bf16 hint, and int8 from ORT's default
    static QDQ quantization), and clipengine's OpenVINO backend on a `clipengine export` folder
    (pruned graphs, symmetric static INT8). All calibrated on the same images."""
    if importlib.util.find_spec("openvino") is None:
        return
    import openvino as ov
    from onnxruntime.quantization import QuantFormat, quantize_static

    from clipengine.backends.openvino_backend import OpenVinoBackend
    from clipengine.export.onnx import export_model
    from clipengine.export.verify import calibration_texts, sample_images
    from clipengine.image.preprocess import PreprocessConfig

    # Calibration: the distribution the image cases feed (normal pixels, other samples) plus
    # preprocessed synthetic pictures like the end-to-end JPEGs (real use: --calibration-dir photos/).
    noise = np.random.default_rng(SEED + 1).standard_normal((25, 3, 224, 224), dtype=np.float32)
    pixels = np.concatenate([noise, sample_images(PreprocessConfig(image_size=224), None)])
    texts = calibration_texts(77)
    folder = workdir / "export"
    t0 = time.perf_counter()
    if not (folder / "manifest.json").exists():
        export_model(model, folder, precisions=["fp32", "int8", "int8w"], image_batches=None, text_batches=None,
                     calibration_images=pixels)  # fmt: skip
    OPENVINO_EXPORT["folder"] = folder
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    peers_: dict[str, dict[str, tuple[Fn, str]]] = {"image": {}, "text": {}}
    ours_: dict[str, dict[str, tuple[Fn, str]]] = {"image": {}, "text": {}}
    for tower, name, calib in (("image", "pixels", pixels), ("text", "tokens", texts)):
        fp32 = onnx_dir / f"{tower}_fp32.onnx"
        qdq = workdir / f"{tower}_int8_qdq_default.onnx"
        if not qdq.exists():
            # ORT's documented static recipe with its defaults (uint8 activations, per-tensor int8 weights).
            quantize_static(str(fp32), str(qdq), _Batches(name, calib), quant_format=QuantFormat.QDQ)
        for label, path, hint, prec in (
            ("OpenVINO fp32", fp32, "f32", "fp32"),
            (f"OpenVINO {LOW['name']} hint", fp32, "bf16", LOW["name"]),
            ("OpenVINO int8 static (ORT QDQ defaults)", qdq, "f32", "int8"),
        ):
            try:
                compiled = core.compile_model(core.read_model(str(path)), "CPU", {**config, "INFERENCE_PRECISION_HINT": hint})
            except RuntimeError as e:  # e.g. OpenVINO 2026.4 rejects ORT's default QDQ around the text embedding Add
                reason = next((line for line in reversed(str(e).splitlines()) if line.strip()), "")
                log(f"openvino peer '{label}' ({tower}) left out: OpenVINO cannot compile it: {reason[:200]}")
                continue
            peers_[tower][label] = (_ov_fn(compiled), prec)
        for prec in ("int8", "int8w", LOW["name"]):
            backend = OpenVinoBackend(folder, device="cpu", precision=prec, threads=threads)
            fn = backend.encode_images if tower == "image" else backend.encode_texts
            ours_[tower][f"clipengine openvino {prec}"] = (_np_fn(fn), prec)
    OPENVINO.update(peers=peers_, ours=ours_)
    log(f"openvino: export + quantization + compile {time.perf_counter() - t0:.0f}s")


class _Batches:
    """ORT CalibrationDataReader: `data` in batches of 8 under the graph input `name`."""

    def __init__(self, name: str, data: np.ndarray) -> None:
        self.it = iter([{name: data[i : i + 8]} for i in range(0, len(data), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def _ov_fn(compiled: Any) -> Fn:
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.cpu().numpy()})
        return torch.from_numpy(np.asarray(next(iter(out.values())))).float()

    return run


def _np_fn(fn: Callable[[np.ndarray], np.ndarray]) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(fn(x.cpu().numpy()))

    return run


def _ort_fn(sess: Any) -> Fn:
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0]).float().to(x.device)

    return run


# ----------------------------------------------------------------------------- timing


def measure(
    contestants: list[Contestant], x: torch.Tensor, rounds: int, min_s: float, log: Callable[[str], None]
) -> list[Contestant]:
    """Warm up (compiles), take cosine vs the first contestant (fp32 reference), then time round-robin.

    Returns fresh Contestant records (the same callables) holding this case's timings.
    """
    cases = [Contestant(c.name, c.peer, c.fn, c.precision) for c in contestants]
    x = x.to(LOW["device"])
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    ref = None
    calls: dict[str, int] = {}
    for c in cases:
        t0 = time.perf_counter()
        c.fn(x)
        sync()
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        y = c.fn(x)
        sync()
        one = time.perf_counter() - t1
        calls[c.name] = max(1, math.ceil(min_s / max(one, 1e-4)))
        if ref is None:
            ref = y
        c.cosine = float(F.cosine_similarity(y.float(), ref.float(), dim=-1).min())
        log(f"  warm {c.name}: {dt:.1f}s, {one * 1000:.1f} ms/call, cos {c.cosine:.6f}")
    for _ in range(rounds):
        for c in cases:
            n = calls[c.name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                c.fn(x)
            sync()
            c.times.append(n * x.shape[0] / (time.perf_counter() - t0))
    return cases


def table(title: str, contestants: list[Contestant], unit: str, batch: int) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table: median items/s, median per-round ratio to the best peer (any, and within the
    cosine >= COSINE_BOUND fidelity bound), min cosine to fp32."""
    rounds = len(contestants[0].times)
    best_any = [max(c.times[r] for c in contestants if c.peer) for r in range(rounds)]
    faithful = [c for c in contestants if c.peer and c.cosine >= COSINE_BOUND]
    best_ok = [max(c.times[r] for c in faithful) for r in range(rounds)]
    rows = []
    for c in contestants:
        ratio = statistics.median(c.times[r] / best_any[r] for r in range(rounds))
        ratio_ok = statistics.median(c.times[r] / best_ok[r] for r in range(rounds))
        rows.append(dict(name=c.name, peer=c.peer, precision=c.precision, per_s=statistics.median(c.times),
                         ratio_to_best_peer=ratio, ratio_to_best_faithful_peer=ratio_ok,
                         ms_per_batch=1000.0 * batch / statistics.median(c.times),
                         min_cosine_vs_fp32=c.cosine))  # fmt: skip
    lines = [f"\n### {title}", "",
             f"| contestant | {unit} (median) | ms per batch of {batch} | x best peer | x best peer with cos >= {COSINE_BOUND} | min cosine vs fp32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        mark = "" if r["peer"] else "**"
        flag = "" if r["min_cosine_vs_fp32"] >= COSINE_BOUND else " (below bound)"
        lines.append(f"| {mark}{r['name']}{mark} | {r['per_s']:.1f} | {r['ms_per_batch']:.3f} | {r['ratio_to_best_peer']:.2f} | "
                     f"{r['ratio_to_best_faithful_peer']:.2f} | {r['min_cosine_vs_fp32']:.5f}{flag} |")  # fmt: skip
    return "\n".join(lines), rows


# ----------------------------------------------------------------------------- inputs


def prompt_tokens(n: int) -> torch.Tensor:
    """`n` realistic zero-shot prompts ("a photo of a {class}.") tokenized to (n, 77)."""
    from clipengine.text.tokenizer import tokenize

    prompts = json.loads((Path(__file__).parents[1] / "src/clipengine/eval/prompts/zeroshot_prompts.json").read_text())
    data = prompts["CIFAR100"]
    classes, templates = data["classes"], data["templates"]
    texts = [templates[i % len(templates)].format(classes[(7 * i) % len(classes)]) for i in range(n)]
    return torch.from_numpy(tokenize(texts)).long()


def long_tokens(n: int) -> torch.Tensor:
    """(n, 77) texts that fill the whole context (worst case: truncation cannot help)."""
    g = torch.Generator().manual_seed(SEED)
    tok = torch.randint(1, 49405, (n, 77), generator=g)
    tok[:, 0], tok[:, -1] = 49406, 49407
    return tok


# ----------------------------------------------------------------------------- end to end


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """Camera-size JPEGs (half 4032x3024, half 1920x1080): smooth noise plus random shapes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(count):
        w, h = (4032, 3024) if i % 2 == 0 else (1920, 1080)
        path = folder / f"img_{i:04d}_{w}x{h}.jpg"
        paths.append(path)
        if path.exists():
            continue
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(50, w // 3)), y0 + int(rng.integers(50, h // 3))]
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        noise = rng.normal(0, 6, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path, quality=90)
    return paths


def e2e_naive(paths: list[Path], oc16: Any, preprocess: Any, batch: int) -> tuple[float, np.ndarray]:
    """The loop a user writes: PIL open, open_clip preprocess, stack, bf16 model; one process."""
    from PIL import Image

    t0 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[s : s + batch]])
            outs.append(F.normalize(oc16.encode_image(x.to(torch.bfloat16)).float(), dim=-1))
    return len(paths) / (time.perf_counter() - t0), torch.cat(outs).numpy()


def e2e_pipeline(folder: Path, workdir: Path, label: str, *args: str) -> tuple[float, np.ndarray, dict[str, Any]]:
    """One `embed_folder` run in a subprocess (benchmarks/e2e_pipeline.py: decode workers spawned from
    a light main module, as under `clipengine embed`); returns (img/s, vectors by file name, stage ms)."""
    import subprocess

    vectors = workdir / f"{label}.npy"
    script = Path(__file__).with_name("e2e_pipeline.py")
    done = subprocess.run([sys.executable, str(script), str(folder), str(vectors), *args],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"e2e_pipeline.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["fps"], np.load(vectors), result["per_image_ms"]


def repeated_folder(paths: list[Path], repeat: int, folder: Path) -> Path:
    """`repeat` hard links (copies where links fail) of every JPEG, named r<k>_<name>, in a fresh folder.

    Why: a pipeline run has a fill (the first batch waits for a whole chunk to decode) and a drain
    (the last batch runs with idle decoders); on 96 images these cost ~25% of the rate, so the
    pipeline rows run long enough to show the steady state a real folder sees."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(repeat):
        for p in paths:
            target = folder / f"r{k}_{p.name}"
            try:
                os.link(p, target)
            except OSError:
                shutil.copyfile(p, target)
    return folder


def min_cos_repeated(vecs: np.ndarray, ref: np.ndarray) -> float:
    """Min cosine of every copy's embedding (rows sorted by file name: r0_*, r1_*, ...) to the reference."""
    copies = vecs.reshape(-1, *ref.shape)
    return float((copies * ref[None]).sum(-1).min())


def run_e2e(args: argparse.Namespace, oc: Any, model: CLIP, log: Callable[[str], None]) -> str:
    import open_clip

    count = 32 if args.quick else 96
    repeat = args.e2e_repeat if args.e2e_repeat is not None else (1 if args.quick else 5)
    folder = Path(args.jpeg_dir)
    t0 = time.perf_counter()
    paths = make_jpegs(folder, count)
    log(f"e2e: {count} JPEGs in {folder} ({time.perf_counter() - t0:.0f}s to generate)")
    # The copies, the saved model and every row's output (~580 MB): removed however the run ends.
    work = Path(tempfile.mkdtemp(prefix="clipengine_e2e_"))
    try:
        # Always a folder of exactly `paths` (linked): --jpeg-dir may hold more files from an earlier
        # run (96 after a full one), which a --quick run embedded and compared with the wrong rows.
        long_folder = repeated_folder(paths, repeat, work / "jpegs")
        preprocess = open_clip.image_transform(224, is_train=False)
        oc16 = bf16_copy(oc)
        lines = [f"\n### End to end: JPEG folder -> embeddings (half 4032x3024, half 1920x1080; batch 32; decode and model share the cores; pipeline rows: {count * repeat} files, each JPEG {repeat}x)", "",
                 "| path | img/s | x naive | min cos vs naive | ms/img per stage (summed over workers) |", "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
        e2e_naive(paths[:2], oc16, preprocess, 32)  # warm-up
        naive, ref = e2e_naive(paths, oc16, preprocess, 32)
        lines.append(f"| naive loop: PIL + open_clip preprocess + open_clip eager bf16, one process | {naive:.1f} | 1.00 | 1.0000 | |")
        from clipengine.models.saving import save_model

        save_model(model, work / "model")  # the same random weights, loaded by the subprocess
        threads = ["--threads", str(args.threads)]
        rows = [
            ("clipengine embed_folder, exact decode + accel compile bf16", "torch_exact",
             ["--backend", "torch", "--model", str(work / "model"), "--precision", "bf16", "--compile", *threads]),
            ("clipengine embed_folder, --fast-decode + accel compile bf16", "torch_fast",
             ["--backend", "torch", "--model", str(work / "model"), "--precision", "bf16", "--compile", "--fast-decode", *threads]),
        ]  # fmt: skip
        if "folder" in OPENVINO_EXPORT:
            rows.append(("clipengine embed_folder, --fast-decode + openvino int8", "openvino_fast",
                         ["--backend", "openvino", "--model", str(OPENVINO_EXPORT["folder"]), "--precision", "int8",
                          "--fast-decode", *threads]))  # fmt: skip
        for label, key, cli in rows:
            try:
                fps, vecs, ms = e2e_pipeline(long_folder, work, key, *cli)
            except RuntimeError as e:
                log(str(e))
                lines.append(f"| {label} | - | - | - | failed (see log) |")
                continue
            cos = min_cos_repeated(vecs, ref)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if v >= 0.05)
            lines.append(f"| {label} | {fps:.1f} | {fps / naive:.2f} | {cos:.4f} | {stages} |")
            log(lines[-1])
        return "\n".join(lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds, no torch.compile peer variants beyond one, 32 JPEGs")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per table (default 5, quick 2)")
    p.add_argument("--min-seconds", type=float, default=None, help="seconds per timed measurement (default 1.0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: fp16, no ONNX, no e2e; image batch 1024 added)")
    p.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime / OpenVINO contestants")
    p.add_argument("--skip-openvino", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile contestants (saves minutes of compiling)")
    p.add_argument("--skip-fp8", action="store_true", help="CUDA: no fp8 rows (they cost two compiles per case)")
    p.add_argument("--autotune", action="store_true",
                   help="CUDA: add clipengine compile max-autotune + CUDA graphs (minutes of autotuning per shape)")
    p.add_argument("--only", choices=["image1", "image32", "image1024", "text", "textlong", "e2e"], action="append",
                   help="run only these cases (repeatable)")
    p.add_argument("--e2e-repeat", type=int, default=None,
                   help="pipeline rows embed each e2e JPEG this many times (hard links; default 5, quick 1): steady-state rates")
    p.add_argument("--jpeg-dir", default=str(Path(tempfile.gettempdir()) / "clipengine_bench_jpegs"))
    p.add_argument("--json", type=Path, default=None, help="also write all rows as JSON here")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    min_s = args.min_seconds or (0.5 if args.quick else 1.0)
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # weights folded into compiled graphs (oneDNN prepacking on CPU)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cuda = args.device.startswith("cuda")
    if cuda:
        LOW.update(dtype=torch.float16, name="fp16", device=args.device)
        if torch.cuda.get_device_capability(torch.device(args.device)) < (8, 9):
            FP8_UNSUPPORTED.append(torch.cuda.get_device_name(torch.device(args.device)))
        log(f"GPU {torch.cuda.get_device_name(torch.device(args.device))}; fp8 rows: {'no' if FP8_UNSUPPORTED else 'yes'}")
    oc, model, hf = build_models(args.device)
    sessions: dict[str, dict[str, Any]] = {}
    if not args.skip_onnx and not cuda:
        t0 = time.perf_counter()
        # Cached exports are keyed by the weights: a stale graph would time fine but compare wrong.
        work = Path(tempfile.gettempdir()) / "clipengine_bench_onnx" / weights_fingerprint(model)
        work.mkdir(parents=True, exist_ok=True)
        sessions = onnx_sessions(model, work, args.threads)
        log(f"onnx export + int8 quantization: {time.perf_counter() - t0:.0f}s")
        if not args.skip_openvino:
            openvino_contestants(model, work, work / "openvino", args.threads, log)
    tables: list[str] = []
    report: dict[str, Any] = {}
    cases = [
        *([("image1024", "image", "Image tower, batch 1024", torch.randn(1024, 3, 224, 224), "img/s")] if cuda else []),
        ("image1", "image", "Image tower, batch 1", torch.randn(1, 3, 224, 224), "img/s"),
        ("image32", "image", "Image tower, batch 32", torch.randn(32, 3, 224, 224), "img/s"),
        ("text", "text", "Text tower, batch 32, zero-shot prompts (<= 20 tokens)", prompt_tokens(32), "seq/s"),
        ("textlong", "text", "Text tower, batch 32, full 77-token texts (worst case)", long_tokens(32), "seq/s"),
    ]
    torch.manual_seed(SEED)
    built: dict[str, list[Contestant]] = {}
    for key, tower, title, x, unit in cases:
        if (args.only and key not in args.only) or (args.quick and key == "textlong"):
            continue
        log(f"{title}:")
        if tower not in built:  # one set of callables per tower: compiled graphs are reused across cases
            built[tower] = (peers(tower, oc, hf, sessions, compile_peers=not args.no_compile)
                            + ours(tower, model, quick=args.quick, compile_ours=not args.no_compile,
                                   autotune=args.autotune, skip_fp8=args.skip_fp8))
        cs = measure(built[tower], x, rounds, min_s, log)
        text, rows = table(title, cs, unit, x.shape[0])
        tables.append(text)
        report[key] = rows
        print(text, flush=True)
        if args.json:  # after every case: a run stopped by a time limit keeps what it measured
            args.json.write_text(json.dumps(report, indent=2))
    if not args.skip_e2e and not cuda and oc is not None and (not args.only or "e2e" in args.only):
        text = run_e2e(args, oc, model, log)
        tables.append(text)
        print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
