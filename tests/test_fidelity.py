"""`report.fidelity`: every lower-precision path states its deviation from fp32, measured or "unmeasured"."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clipengine.export.manifest import EngineInfo, Manifest, Parity
from clipengine.report import DOCUMENTED_DEVIATION, fidelity, fidelity_line

_ROOT = Path(__file__).parents[1]


def _parity(min_cos: float, *, passed: bool = True, samples: int = 4) -> Parity:
    return Parity(max_abs=1 - min_cos, min_cos=min_cos, bound={"min_cos": 0.99}, passed=passed, samples=samples)


def _engine(tower: str, precision: str, batch: int | None, parity: Parity | None, **runtime: Parity) -> EngineInfo:
    name = f"{tower}_{precision}_{'dyn' if batch is None else f'b{batch}'}.onnx"
    return EngineInfo(tower=tower, precision=precision, batch=batch, file=name, sha256="0" * 64, inputs=[],
                      outputs=[], parity=parity, runtime_parity=dict(runtime))  # fmt: skip


def _backend(name: str, precision: str, engines: list[EngineInfo], engine_precision: str | None = None) -> Any:
    manifest = Manifest(model="tiny", pretrained=None, architecture={}, preprocess={}, context_length=77,
                        logit_scale=100.0, embed_dim=8, image_size=32, engines=engines)  # fmt: skip
    return SimpleNamespace(name=name, precision=precision, manifest=manifest,
                           engine_precision=engine_precision or precision)  # fmt: skip


def test_fp32_on_the_exact_decoder_states_nothing() -> None:
    assert fidelity(SimpleNamespace(name="torch", precision="fp32")) is None
    assert fidelity(_backend("onnx", "fp32", [_engine("image", "fp32", None, _parity(1.0))])) is None
    assert fidelity_line(None) is None


def test_onnx_int8_states_the_worst_engine_measured_at_export() -> None:
    engines = [
        _engine("image", "int8", 1, _parity(0.9995)),
        _engine("image", "int8", 8, _parity(0.9991, samples=8)),
        _engine("text", "int8", None, _parity(0.9987)),
        _engine("image", "fp32", None, _parity(1.0)),  # another precision: not what runs
    ]
    info = fidelity(_backend("onnx", "int8", engines))
    assert info is not None and info["precision"] == "int8"
    assert info["towers"]["image"] == {"min_cos": 0.9991, "max_abs": pytest.approx(1 - 0.9991), "samples": 12,
                                       "passed": True}  # fmt: skip
    assert info["towers"]["text"]["min_cos"] == 0.9987
    assert "under ONNX Runtime (CPU)" in info["measured"]
    line = fidelity_line(info)
    assert line == ("note: onnx int8 is not fp32: min cosine image 0.99910, text 0.99870 to fp32 (measured at "
                    "export under ONNX Runtime (CPU) against fp32 PyTorch, manifest.json)")  # fmt: skip


def test_a_failed_or_partly_measured_tower_says_so() -> None:
    engines = [
        _engine("image", "fp16", 1, _parity(0.95, passed=False)),
        _engine("image", "fp16", 4, None),
        _engine("text", "fp16", None, None),
    ]
    info = fidelity(_backend("onnx", "fp16", engines))
    assert info is not None and info["towers"]["text"] is None
    assert info["towers"]["image"]["unmeasured_engines"] == ["image_fp16_b4.onnx"]
    line = fidelity_line(info)
    assert line is not None
    assert "image 0.95000 (below its bound) (unmeasured: image_fp16_b4.onnx)" in line and "text unmeasured" in line


def test_openvino_uses_its_own_runtime_parity_bf16_on_the_fp32_engines() -> None:
    engines = [
        _engine("image", "fp32", None, _parity(1.0), openvino=_parity(1.0), **{"openvino-bf16": _parity(0.9993)}),
        _engine("text", "fp32", None, _parity(1.0), openvino=_parity(1.0), **{"openvino-bf16": _parity(0.9990)}),
    ]
    info = fidelity(_backend("openvino", "bf16", engines, engine_precision="fp32"))
    assert info is not None
    assert (info["towers"]["image"]["min_cos"], info["towers"]["text"]["min_cos"]) == (0.9993, 0.9990)
    assert info["measured"] == "at export under OpenVINO (CPU) in bf16 against fp32 PyTorch, manifest.json"


def test_a_run_off_the_cpu_says_the_exports_cpu_measurement_does_not_cover_it() -> None:
    backend = _backend("onnx", "fp16", [_engine("image", "fp16", None, _parity(0.9999))])
    backend.device = "cuda:0"
    info = fidelity(backend)
    assert info is not None and info["measured"].endswith("manifest.json; unmeasured on cuda:0, where this runs")


def test_openvino_unmeasured_there_says_unmeasured_and_gives_ort_as_a_hint() -> None:
    engines = [_engine("image", "int8", None, _parity(0.9994)), _engine("text", "int8", None, _parity(0.9981))]
    info = fidelity(_backend("openvino", "int8", engines))
    assert info is not None and info["towers"] == {"image": None, "text": None}
    assert info["measured"].startswith("unmeasured under OpenVINO")
    line = fidelity_line(info)
    assert line is not None and "deviation from fp32 unmeasured under OpenVINO" in line
    assert "ONNX Runtime check of the same engines: min cosine image 0.99940, text 0.99810" in line


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8"])
def test_torch_lower_precision_is_unmeasured_with_the_documented_reference(precision: str) -> None:
    info = fidelity(SimpleNamespace(name="torch", precision=precision, device="cpu"))
    assert info is not None and info["towers"] == {"image": None, "text": None}
    assert info["measured"] == "unmeasured for this model"
    assert info["reference"] == DOCUMENTED_DEVIATION[f"torch-{precision}"]
    line = fidelity_line(info)
    assert line == (f"note: torch {precision} is not fp32: deviation from fp32 unmeasured for this model "
                    f"[{DOCUMENTED_DEVIATION[f'torch-{precision}']}]")  # fmt: skip


def test_an_unknown_backend_at_lower_precision_is_unmeasured_without_a_reference() -> None:
    info = fidelity(SimpleNamespace(name="custom", precision="int8"))
    assert info is not None and info["reference"] is None and info["measured"] == "unmeasured for this model"


def test_reduced_decoding_is_stated_even_at_fp32() -> None:
    fast = fidelity(SimpleNamespace(name="torch", precision="fp32"), fast_decode=True)
    assert fast is not None and fast["towers"] is None
    assert fast["decode"] == {"mode": "fast_decode", "reference": DOCUMENTED_DEVIATION["fast_decode"]}
    assert fidelity_line(fast) == (
        f"note: fast_decode is not the exact decode: unmeasured for this model [{DOCUMENTED_DEVIATION['fast_decode']}]"
    )
    gpu = fidelity(SimpleNamespace(name="torch", precision="fp16"), gpu_decoder="nvimgcodec")
    assert gpu is not None and gpu["decode"] == {"mode": "gpu_decode (nvimgcodec)", "reference": None}
    line = fidelity_line(gpu)
    assert line is not None and "torch fp16 is not fp32" in line and "gpu_decode (nvimgcodec) is not" in line
    both = fidelity(SimpleNamespace(name="torch", precision="fp32"), fast_decode=True, gpu_decoder="torchvision")
    assert both is not None and both["decode"] == {
        "mode": "gpu_decode (torchvision) + fast_decode on the CPU share",
        "reference": f"{DOCUMENTED_DEVIATION['gpu_decode-torchvision']}; {DOCUMENTED_DEVIATION['fast_decode']}",
    }


@pytest.mark.parametrize("key", sorted(DOCUMENTED_DEVIATION))
def test_every_documented_deviation_is_in_the_document_it_names(key: str) -> None:
    """The numbers the CLI quotes are the docs' own: each one appears in the file named."""
    text = DOCUMENTED_DEVIATION[key]
    doc = (_ROOT / text.split(",")[0]).read_text(encoding="utf-8")
    numbers = re.findall(r"0\.\d{4,}", text)
    assert numbers
    for number in numbers:
        assert number in doc, f"{key}: {number} is not in {text.split(',')[0]}"


class _HalfWrongIndex:
    """Exact search whose last `wrong` hits of each query are swapped for the worst rows."""

    def __init__(self, vectors: Any, ids: list[str], wrong: int) -> None:
        self.v, self.ids, self.wrong = vectors, ids, wrong
        self.params = SimpleNamespace(exact=False, to_dict=lambda: {"kind": "ivf", "nlist": 4, "nprobe": 1})

    def search_vectors(self, q: Any, k: int) -> list[list[tuple[str, float]]]:
        import numpy as np

        out = []
        for row in q @ self.v.T:
            order = np.argsort(-row)
            picked = list(order[: k - self.wrong]) + list(order[::-1][: self.wrong])
            out.append([(self.ids[i], float(row[i])) for i in picked])
        return out


@pytest.mark.parametrize(("wrong", "expected"), [(0, 1.0), (5, 0.5), (11, 0.0)])
def test_index_recall_counts_the_exact_neighbours_found(wrong: int, expected: float) -> None:
    import numpy as np

    from clipengine.report import index_recall, recall_line

    v = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"img{i}" for i in range(300)]
    # k+1 hits asked and the query's own row (the best) dropped: wrong=5 leaves 5 of the 10 right.
    recall = index_recall(_HalfWrongIndex(v, ids, wrong), v, ids, k=10, queries=50)
    assert recall == {"k": 10, "recall": pytest.approx(expected), "queries": 50, "params": {"nlist": 4, "nprobe": 1}}
    assert recall_line("ivf", recall) == (
        f"note: ivf is an approximate index: recall@10 {expected:.3f} against exact search, measured at build "
        "on 50 of its own vectors (nlist=4, nprobe=1)"
    )
    assert "recall unmeasured" in recall_line("hnsw", None)


def test_index_recall_of_real_indexes() -> None:
    import numpy as np

    pytest.importorskip("faiss")
    from clipengine.index import Index
    from clipengine.report import index_recall

    v = np.random.default_rng(1).standard_normal((2000, 32)).astype(np.float32)
    ids = [str(i) for i in range(len(v))]
    assert index_recall(Index.build(ids, v, model="m", kind="flat"), v, ids) is None  # exact: nothing to state
    ivf = index_recall(Index.build(ids, v, model="m", kind="ivf", nlist=32, nprobe=1), v, ids)
    assert ivf is not None and 0.0 < ivf["recall"] < 0.9  # one list of 32 on uniform data misses most
    full = index_recall(Index.build(ids, v, model="m", kind="ivf", nlist=32, nprobe=32), v, ids)
    assert full is not None and full["recall"] == 1.0  # every list visited: exact


def test_index_recall_in_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact search runs over row blocks (bounded memory at any N): the same figure in blocks of 7."""
    import numpy as np

    from clipengine import report

    v = np.random.default_rng(2).standard_normal((200, 8)).astype(np.float16)
    ids = [f"img{i}" for i in range(200)]
    index = _HalfWrongIndex(v.astype(np.float32) / np.linalg.norm(v.astype(np.float32), axis=1, keepdims=True),
                            ids, wrong=3)  # fmt: skip
    whole = report.index_recall(index, v, ids, k=5, queries=40)
    monkeypatch.setattr(report, "_RECALL_BLOCK", 7)
    assert report.index_recall(index, v, ids, k=5, queries=40) == whole
    assert whole is not None and whole["recall"] == pytest.approx(2 / 5)  # self + 2 right, 3 worst, of k+1


def test_something_that_is_not_a_backend_is_refused_not_called_fp32() -> None:
    # fidelity(model) for an int8 model returned None, "fp32, nothing to state": a ClipModel has no
    # precision of its own, and a missing one read as fp32.
    from clipengine.errors import InputError

    model = SimpleNamespace(backend=_backend("onnx", "int8", [_engine("image", "int8", None, _parity(0.999))]))
    for wrong in (model, None, "int8"):
        with pytest.raises(InputError, match=r"^fidelity takes a Backend \(e\.g\. model\.backend\), got "):
            fidelity(wrong)
