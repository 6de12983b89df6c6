"""`clipengine eval zeroshot|linear-probe` and `download-data` through the CLI, with the tiny-synth model."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipengine.cli.app import app, main
from clipengine.eval import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SYNTH = REPO_ROOT / "src" / "clipengine" / "weights" / "tiny-synth"
MIN_SHAPE_TOP1 = 80.0  # percent; measured value in docs/eval.md
MIN_AGREEMENT = 99.0  # fp16 / int8 engines vs fp32, percent of identical top-1 predictions

pytestmark = pytest.mark.skipif(
    not (TINY_SYNTH / "model.safetensors").is_file(), reason="tiny-synth weights not generated"
)


@pytest.fixture(autouse=True)
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """On an oversubscribed shared box two spinning intra-op threads run ~10x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    train = synthetic.generate(200, seed=21, task="shape")
    test = synthetic.generate(300, seed=22, task="shape")
    synthetic.write_cifar10(root, train, test)
    return root


def _top1(output: str, engine: str = "torch fp32") -> float:
    match = re.search(rf"^{engine}: top-1 ([\d.]+)%", output, re.M)
    assert match, output
    return float(match.group(1))


def test_zeroshot_cifar10_reports_high_accuracy(cifar10: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    args = ["eval", "zeroshot", "--dataset", "cifar10", "--root", str(cifar10), "--model", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _top1(result.output) >= MIN_SHAPE_TOP1
    assert "chance 10.00%" in result.output
    report = json.loads((out / "zeroshot_cifar10-test.json").read_text())
    r = report["results"][0]
    assert r["n"] == 300 and r["templates"] == 18 and set(r["per_class"]) == set(synthetic.SHAPES)
    assert "| torch fp32 | cifar10-test | 300 |" in (out / "zeroshot_cifar10-test.md").read_text()
    assert (out / "zeroshot_cifar10-test_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zeroshot_imagefolder_with_user_prompts(tmp_path: Path) -> None:
    synthetic.write_imagefolder(
        tmp_path / "data", synthetic.generate(60, seed=23, task="shape", image_size=48)
    )
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"templates": ["a photo of a {}.", "a {}"]}))
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(tmp_path / "data"), "-m", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, "--prompts", str(prompts), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert _top1(result.output) >= MIN_SHAPE_TOP1 - 10


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of the 10 synthetic shapes (as many classes as CIFAR-10, by design)."""
    root = tmp_path_factory.mktemp("shapes")
    synthetic.write_imagefolder(root, synthetic.generate(60, seed=24, task="shape", image_size=32))
    assert len([p for p in root.iterdir() if p.is_dir()]) == len(synthetic.SHAPES) == 10
    return root


def _per_class(out: Path, *extra: str, root: Path) -> list[str]:
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(root), "-m", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    (report,) = out.glob("zeroshot_*.json")
    return sorted(json.loads(report.read_text())["results"][0]["per_class"])


def test_prompt_set_names_are_used_only_when_chosen(shapes_folder: Path, tmp_path: Path) -> None:
    """The default entry (CIFAR10's for a folder) lends only its templates, even with 10 classes;
    an entry chosen with --prompt-set (bundled or from --prompts) brings its class names too."""
    own = sorted(synthetic.SHAPES)
    assert _per_class(tmp_path / "auto", root=shapes_folder) == own
    cifar = _per_class(tmp_path / "cifar", "--prompt-set", "CIFAR10", root=shapes_folder)
    assert "airplane" in cifar and "circle" not in cifar
    user = tmp_path / "prompts.json"
    names = [f"{s} shape" for s in sorted(s.replace(" ", "_") for s in synthetic.SHAPES)]
    user.write_text(json.dumps({"shapes": {"classes": names, "templates": ["a {}"]}}))
    picked = _per_class(tmp_path / "user", "--prompts", str(user), "--prompt-set", "shapes", root=shapes_folder)
    assert picked == sorted(names)


@pytest.mark.parametrize(
    ("extra", "counts"),
    [
        (["--prompt-set", "CIFAR100"], "'CIFAR100' (bundled zeroshot_prompts.json) has 100 class names"),
        (["--prompt-set", "ImageNet"], "has 1000 class names"),
        (["--prompts", "THREE"], "has 3 class names"),
    ],
)
def test_prompt_set_with_another_class_count_is_refused(
    shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], counts: str
) -> None:
    """It used to fall back to the folder names silently; the error names both counts and the fixes."""
    three = tmp_path / "three.json"
    three.write_text(json.dumps({"classes": ["a", "b", "c"], "templates": ["a {}"]}))
    extra = [str(three) if x == "THREE" else x for x in extra]
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(shapes_folder), "-m", "no-model-needed"]
    code = main([*args, *extra, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: prompt set") and err.count("\n") == 1, err
    assert counts in err and "the dataset has 10 classes" in err and '"templates"' in err
    assert not (tmp_path / "r").exists()


def test_linear_probe_second_run_uses_cache(cifar10: Path, tmp_path: Path) -> None:
    args = ["eval", "linear-probe", "-d", "cifar10", "--root", str(cifar10), "-m", str(TINY_SYNTH)]
    args += ["--out", str(tmp_path)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "cached 0/2" in first.output
    second = CliRunner().invoke(app, args)
    assert "cached 2/2" in second.output
    top1 = float(re.search(r"linear-probe top-1 ([\d.]+)%", second.output).group(1))  # type: ignore[union-attr]
    assert top1 >= MIN_SHAPE_TOP1


def test_missing_dataset_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "zeroshot", "-d", "cifar100", "--root", str(tmp_path), "-m", str(TINY_SYNTH)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: no CIFAR data under") and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["zeroshot", "--batch", "0"],
        ["zeroshot", "--batch", "-1"],  # ran and reported a wrong accuracy
        ["zeroshot", "--limit", "-1"],  # ran on all but the last image
        ["zeroshot", "--out", "A_FILE"],
        ["linear-probe", "--batch", "0"],
        ["linear-probe", "--C", "0"],
        ["linear-probe", "--C", "-1"],
        ["linear-probe", "--C", "inf"],  # the report's JSON held "C": Infinity, which JSON parsers refuse
        ["linear-probe", "--C", "nan"],
    ],
)
def test_bad_numbers_or_report_file_are_usage_errors(tmp_path: Path, extra: list[str]) -> None:
    (tmp_path / "A_FILE").write_text("not a folder")
    extra = [str(tmp_path / "A_FILE") if x == "A_FILE" else x for x in extra]
    args = ["eval", extra[0], "-d", "folder", "--root", str(tmp_path / "no-data"), "-m", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, *extra[1:]])
    assert result.exit_code == 2, (result.output, result.exception)
    assert extra[1] in result.output


def test_download_data_offline_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipengine.eval import download

    def offline(req, timeout=None):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import tqdm

    bars: list[object] = []  # on a terminal a bar drawn before the connection stayed above the error
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(k))
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    code = main(["download-data", "cifar10", "--root", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error:") and "offline" in err[0]
    assert bars == []


def test_download_data_of_an_unknown_name_draws_no_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `download`: the name is checked before a progress bar is made (on a terminal it drew one)."""
    import tqdm

    bars: list[object] = []
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(k))
    assert main(["download-data", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unknown dataset 'nosuch'; downloadable: cifar10, cifar100\n" and bars == []


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-synth exported to fp32 / fp16 / int8 ONNX engines (dynamic batch) by `clipengine export`."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("export") / "tiny-synth"
    code = main(["export", "tiny-synth", "-o", str(out), "--precision", "fp32,fp16,int8", "--dynamic"])
    assert code == 0
    return out


def test_compare_fp16_int8_agree_with_fp32(cifar10: Path, onnx_export: Path, tmp_path: Path) -> None:
    args = ["eval", "zeroshot", "-d", "cifar10", "--root", str(cifar10), "-m", str(onnx_export)]
    result = CliRunner().invoke(app, [*args, "--compare", "fp32,fp16,int8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| engine | top-1 % | top-5 % | Δ top-1 (pts) | agreement with onnx fp32 % |" in result.output
    rows = json.loads((tmp_path / "zeroshot_cifar10-test.json").read_text())["comparison"]
    assert [r["engine"] for r in rows] == ["onnx fp32", "onnx fp16", "onnx int8"]
    assert rows[0]["top1"] * 100 >= MIN_SHAPE_TOP1
    for row in rows[1:]:
        assert row["agreement"] * 100 >= MIN_AGREEMENT, rows
        assert abs(row["delta_top1"]) <= 0.01, rows
    assert "## Engines compared" in (tmp_path / "zeroshot_cifar10-test.md").read_text()


def test_zeroshot_flat_folder_with_labels_file(tmp_path: Path) -> None:
    """imagenet_val_1k style: one folder of images + '<file> <label>' lines + classnames.json."""
    synthetic.write_flat_folder(tmp_path / "flat", synthetic.generate(80, seed=24, task="shape"))
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(tmp_path / "flat"), "-m", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, "--labels", "labels.txt", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert _top1(result.output) >= MIN_SHAPE_TOP1 - 10


def test_backend_openvino_runs_an_export_folder(cifar10: Path, onnx_export: Path, tmp_path: Path) -> None:
    """`--backend openvino` works on eval as on every command that takes an export folder (docs/export.md)."""
    pytest.importorskip("openvino")
    args = ["eval", "zeroshot", "-d", "cifar10", "--root", str(cifar10), "-m", str(onnx_export), "--limit", "100"]
    result = CliRunner().invoke(app, [*args, "--backend", "openvino", "--compare", "fp32,int8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert _top1(result.output, "openvino fp32") >= MIN_SHAPE_TOP1
    assert _top1(result.output, "openvino int8") >= MIN_SHAPE_TOP1
    args = ["eval", "linear-probe", "-d", "cifar10", "--root", str(cifar10), "-m", str(onnx_export), "--limit", "100"]
    result = CliRunner().invoke(app, [*args, "--backend", "openvino", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("openvino fp32: linear-probe top-1")
    result = CliRunner().invoke(app, [*args, "--backend", "tensorrt"])
    assert result.exit_code == 2 and "--backend" in result.output


def test_an_unreadable_image_is_left_out_and_named_not_fatal(shapes_folder: Path, tmp_path: Path) -> None:
    """One empty file in the folder: the eval completes on the others, says so on stderr, and the
    reports list the file with its reason."""
    import shutil

    root = shutil.copytree(shapes_folder, tmp_path / "data")
    broken = sorted(root.rglob("*.png"))[7]
    broken.write_bytes(b"")
    out = tmp_path / "r"
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(root), "-m", str(TINY_SYNTH), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "59 images" in result.stdout
    assert "left out: 1 unreadable image(s)" in result.stderr and broken.name in result.stderr
    (report,) = out.glob("zeroshot_*.json")
    (row,) = json.loads(report.read_text())["results"][0]["unreadable"]
    assert row["path"] == str(broken) and row["reason"]
    assert f"- {broken}: " in next(out.glob("zeroshot_*.md")).read_text()


def test_compare_refuses_a_precision_before_evaluating_any(
    shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch has no int8: refused at once (it was, after a whole fp32 evaluation whose result was lost).
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(shapes_folder), "-m", str(TINY_SYNTH)]
    assert main([*args, "--compare", "fp32,int8", "--out", str(tmp_path / "r")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: unknown precision 'int8'") and err.count("\n") == 1


def test_compare_refuses_fp16_on_cpu_before_loading_fp32(
    shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 needs CUDA: refused before the fp32 engine is loaded (it was read and built first)."""
    from clipengine.cli import eval_cmd

    loads: list[str] = []
    monkeypatch.setattr(eval_cmd, "_load", lambda model, backend, precision, *a: loads.append(precision))
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(shapes_folder), "-m", str(TINY_SYNTH), "--device", "cpu"]
    assert main([*args, "--compare", "fp32,fp16", "--out", str(tmp_path / "r")]) == 1
    out, err = capsys.readouterr()
    assert loads == [] and out == "" and err.startswith("error: fp16 needs a CUDA device") and err.count("\n") == 1


@pytest.mark.parametrize("compare", ["fp32,,bf16", "fp32,", "fp32,fp32"])
def test_compare_with_an_empty_or_repeated_entry_is_a_usage_error(shapes_folder: Path, compare: str) -> None:
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(shapes_folder), "-m", str(TINY_SYNTH)]
    result = CliRunner().invoke(app, [*args, "--compare", compare])
    assert result.exit_code == 2 and "--compare" in result.output and "distinct precisions" in result.output


def test_unreadable_file_name_with_a_newline_and_escape_is_one_escaped_line(
    shapes_folder: Path, tmp_path: Path
) -> None:
    """The name went to the terminal raw: a newline split the message, an ESC reached the terminal."""
    import shutil

    root = shutil.copytree(shapes_folder, tmp_path / "data")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "evil\x1b[31mred\nx.png").write_bytes(b"not an image")
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(root), "-m", str(TINY_SYNTH),
            "--out", str(tmp_path / "r")]  # fmt: skip
    result = CliRunner().invoke(app, args, color=True)
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if "left out:" in ln]
    assert "evil\\x1b[31mred\\nx.png: " in line and "\x1b" not in result.stderr.split("left out:")[1]


def test_folder_of_wordnet_id_class_names_is_refused(tmp_path: Path) -> None:
    """`-d folder` on an ImageNet subset prompted "a photo of a n01440764." for every class: a
    near-chance top-1 reported as the model's. Refused, naming the ways to give real names."""
    from PIL import Image

    for wnid in ("n01440764", "n01443537"):
        (tmp_path / "data" / wnid).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / wnid / "a.png")
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(tmp_path / "data"), "-m", str(TINY_SYNTH),
            "--out", str(tmp_path / "r")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert "WordNet ids (n01440764, n01443537, ...)" in str(result.exception)
    assert "--class-map" in str(result.exception) and not (tmp_path / "r").exists()
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    result = CliRunner().invoke(app, [*args, "--class-map", str(class_map)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["zeroshot", "linear-probe"])
def test_a_report_folder_that_cannot_be_made_is_refused_before_evaluating(
    shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A file in the way of --out was found only by the report's write, after the whole evaluation
    (or the features and the fit): the result was lost. (A file as --out itself typer refuses.)"""
    (tmp_path / "afile").write_text("")
    args = ["eval", command, "-d", "folder", "--root", str(tmp_path / "no-data"), "-m", str(TINY_SYNTH)]
    assert main([*args, "--out", str(tmp_path / "afile" / "reports")]) == 2  # a usage error, as --out afile
    _, err = capsys.readouterr()  # refused before the (missing) dataset is even looked at
    assert err.endswith(
        f"Error: Invalid value for --out: {tmp_path / 'afile'}: a file, not a folder: the output folder cannot go there\n"
    ), err
