"""What `pip install clipengine[...]` delivers: the wheel's files, each extra's requirements, and the
one-line install hint when an optional dependency is missing."""

from __future__ import annotations

import ast
import email
import json
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tomllib

from clipengine.extras import EXTRA_FOR_MODULE, install_hint

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "clipengine"

# Data the package reads at run time; a wheel without one of them fails only when that feature runs.
RUNTIME_DATA = [
    "clipengine/assets/bpe_simple_vocab_16e6.txt.gz",
    "clipengine/assets/LICENSE-openai-clip.txt",
    "clipengine/eval/prompts/zeroshot_prompts.json",
    "clipengine/models/configs/ViT-B-32.json",
    "clipengine/models/configs/RN50.json",
    "clipengine/serve/static/index.html",
    "clipengine/serve/static/app.js",
    "clipengine/serve/static/style.css",
    "clipengine/weights/tiny-synth/config.json",
    "clipengine/weights/tiny-synth/model.safetensors",
]

# Import name -> the distribution that provides it, where the two differ.
_DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "faiss": "faiss-cpu",
    "multipart": "python-multipart",
    "python_multipart": "python-multipart",
    "onnxconverter_common": "onnxconverter-common",
    "starlette": "fastapi",  # starlette and pydantic come with fastapi
    "pydantic": "fastapi",
}
# Third-party imports that no extra provides on purpose: installed by hand for the GPU decode path
# (torchvision: scripts/setup.sh pins it next to torch; nvidia: the CUDA-specific [gpu-decode] extra;
# triton: comes with PyTorch's CUDA wheels, and its absence only means torch ops, image.gpu_fused).
_NOT_IN_AN_EXTRA = {"torchvision", "nvidia", "triton"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _extra_distributions(extra: str) -> set[str]:
    """Distribution names `clipengine[extra]` installs, following self-references like clipengine[torch]."""
    project = _pyproject()["project"]
    names = {_name(r) for r in project["dependencies"]}
    for requirement in project["optional-dependencies"][extra]:
        nested = re.fullmatch(r"clipengine\[([\w,-]+)\]", requirement)
        if nested:
            for inner in nested.group(1).split(","):
                names |= _extra_distributions(inner)
        else:
            names.add(_name(requirement))
    return names


def _third_party_imports() -> set[str]:
    """Top-level names of every non-stdlib module that src/clipengine imports, at any depth."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"clipengine", "__future__"}


def test_every_optional_import_has_an_extra_that_installs_it() -> None:
    core = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    core_imports = {"PIL" if c == "pillow" else c for c in core}
    optional = _third_party_imports() - core_imports - _NOT_IN_AN_EXTRA
    assert optional - set(EXTRA_FOR_MODULE) == set(), "imported but no extra named for it in extras.py"
    for module in optional:
        extra = EXTRA_FOR_MODULE[module]
        dist = _DISTRIBUTION.get(module, module).replace("_", "-")
        assert dist in _extra_distributions(extra), f"{module}: clipengine[{extra}] does not install {dist}"


@pytest.mark.parametrize(
    ("extra", "needed"),
    [
        ("onnx", {"onnxruntime", "onnx", "numpy", "pillow"}),
        ("serve", {"fastapi", "uvicorn", "python-multipart"}),
        ("ray", {"ray", "pyarrow"}),
        ("hf", {"torch", "safetensors"}),  # hf-hub: checkpoints are converted with torch
        ("export", {"torch", "onnx", "onnxscript", "onnxruntime", "onnxconverter-common"}),
        ("dev", {"pytest", "pytest-timeout", "hypothesis", "ruff", "mypy", "import-linter"}),
    ],
)
def test_extras_install_what_their_features_need(extra: str, needed: set[str]) -> None:
    assert needed - _extra_distributions(extra) == set()


def test_the_runtime_extra_pulls_no_torch() -> None:
    for extra in ("onnx", "openvino", "serve", "index", "ray"):
        assert "torch" not in _extra_distributions(extra), extra


def test_install_hint_names_the_extra() -> None:
    assert (
        install_hint(ModuleNotFoundError("x", name="faiss"))
        == 'faiss is not installed: pip install "clipengine[index]"'
    )
    hint = install_hint(ModuleNotFoundError("x", name="torch._inductor"))
    assert hint is not None and hint.startswith('torch is not installed: pip install "clipengine[torch]"')
    # Not an optional dependency: a broken install or a bug, whose traceback is the report.
    assert install_hint(ModuleNotFoundError("x", name="clipengine.cli.nothing")) is None
    assert install_hint(ModuleNotFoundError("x", name="numpy")) is None
    assert install_hint(ModuleNotFoundError("x")) is None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (an in-tree build/ could add files deleted since)."""
    tree = tmp_path_factory.mktemp("wheel_src")
    shutil.copytree(SRC, tree / "src" / "clipengine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    out = tree / "dist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(tree),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("clipengine-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        f"clipengine/{p.relative_to(SRC).as_posix()}"
        for p in SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert sources - names == set(), "in src/clipengine but not in the wheel (package-data in pyproject.toml)"
    assert set(RUNTIME_DATA) - names == set()


@pytest.mark.slow
def test_wheel_metadata_declares_the_extras_and_the_command(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    info = next(n.rsplit("/", 1)[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
    assert set(metadata.get_all("Provides-Extra") or []) >= {"onnx", "serve", "ray", "hf", "dev", "torch"}
    assert "clipengine = clipengine.cli.app:main" in archive.read(f"{info}/entry_points.txt").decode()


# Runs the CLI with some modules made unimportable, as in an environment without that extra.
_BLOCKED_CLI = textwrap.dedent(
    """
    import importlib.abc, json, sys

    blocked = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from clipengine.cli.app import main

    code = main(sys.argv[2:])
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & blocked)
    print(json.dumps({"code": code, "loaded": loaded}))
    """
)


def _run_blocked(tmp_path: Path, blocked: str, *argv: str) -> tuple[dict[str, Any], str]:
    script = tmp_path / "blocked_cli.py"
    script.write_text(_BLOCKED_CLI)
    proc = subprocess.run(
        [sys.executable, str(script), blocked, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("packaging_export") / "tiny"
    export_model(tiny_model, out, image_batches=(1,), text_batches=(2,), verify=False)
    return out


@pytest.mark.integration
def test_predict_on_an_export_folder_needs_no_torch(export_dir: Path, clip_png: Path, tmp_path: Path) -> None:
    result, _ = _run_blocked(
        tmp_path,
        "torch,safetensors",
        "predict",
        str(clip_png),
        "--model",
        str(export_dir),
        "-t",
        "a diagram",
        "-t",
        "a dog",
    )
    assert result == {"code": 0, "loaded": []}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("blocked", "argv", "hint"),
    [
        (
            "torch",
            ["predict", "{png}", "-t", "a", "-t", "b", "--model", "tiny-synth@synthetic"],
            'torch is not installed: pip install "clipengine[torch]"',
        ),
        (
            "fastapi",
            ["serve", "--engine", "{export}", "--port", "0"],
            'fastapi is not installed: pip install "clipengine[serve]"',
        ),
        ("faiss", ["search", "{export}", "a dog"], 'faiss is not installed: pip install "clipengine[index]"'),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    export_dir: Path, clip_png: Path, tmp_path: Path, blocked: str, argv: list[str], hint: str
) -> None:
    args = [a.format(png=clip_png, export=export_dir) for a in argv]
    result, stderr = _run_blocked(tmp_path, blocked, *args)
    assert result["code"] == 1
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], stderr


_BLOCKED_API = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "safetensors"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import clipengine
    from clipengine.errors import BackendError

    model = clipengine.load(sys.argv[1])
    shape = list(model.encode_texts(["a dog", "a cat"]).shape)
    try:
        clipengine.load("tiny-synth")
        error = None
    except BackendError as e:
        error = str(e)
    print(json.dumps({"shape": shape, "error": error}))
    """
)


@pytest.mark.integration
def test_python_api_without_torch_runs_exports_and_names_the_extra_for_checkpoints(
    export_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "blocked_api.py"
    script.write_text(_BLOCKED_API)
    proc = subprocess.run(
        [sys.executable, str(script), str(export_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 32]
    assert result["error"].startswith(
        'loading tiny-synth: torch is not installed: pip install "clipengine[torch]"'
    )
