"""The benchmark scripts still start: no test runs them, and they are how docs/performance.md's
numbers are re-measured, so a change to src/ (a moved name, a renamed module) could break one
unnoticed until a reviewer's rerun ends in a traceback.

Two cheap checks: every script answers `--help` (usage, exit 0, also the GPU-only ones on a machine
without CUDA), and every name a script imports from clipengine or from a sibling script exists.
The second is needed because most scripts import clipengine inside `main`, after parsing their
arguments, where `--help` never reaches."""

from __future__ import annotations

import ast
import importlib
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def _has_main_block(tree: ast.Module) -> bool:
    """True for a script (`if __name__ == "__main__":`), False for a module the others import."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_there_are_benchmarks() -> None:
    assert len(BENCHMARKS) >= 10, f"benchmarks/*.py not found under {ROOT}"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_benchmark_answers_help(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process, as `python benchmarks/X.py --help` runs it: a subprocess each would re-import
    # torch (~8 s of CPU for all of them); what a script imports at its top still runs here.
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put benchmarks/ first on it
    before = set(sys.modules)
    try:
        if _has_main_block(ast.parse(path.read_text(encoding="utf-8"))):
            with pytest.raises(SystemExit) as exit_info:
                runpy.run_path(str(path), run_name="__main__")
            assert exit_info.value.code in (0, None), capsys.readouterr().err
            assert "usage:" in capsys.readouterr().out
        else:  # a module the scripts import (decode_split.py): importing it is all there is
            runpy.run_path(str(path), run_name="__main__")
    finally:
        for sibling in {p.stem for p in BENCHMARKS} & (set(sys.modules) - before):
            del sys.modules[sibling]  # a later test's script must import its own copy


def test_every_imported_name_exists() -> None:
    siblings = {
        path.stem: _top_level_names(ast.parse(path.read_text(encoding="utf-8"))) for path in BENCHMARKS
    }
    missing = []
    for path in BENCHMARKS:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("clipengine"):
                        try:
                            importlib.import_module(alias.name)
                        except ImportError as e:
                            missing.append(f"{path.name}:{node.lineno}: import {alias.name}: {e}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                wanted = [alias.name for alias in node.names]
                if node.module in siblings:
                    missing += [f"{path.name}:{node.lineno}: {node.module} has no {name}"
                                for name in wanted if name not in siblings[node.module]]  # fmt: skip
                elif node.module.split(".")[0] == "clipengine":
                    missing += _missing_in_package(path.name, node.lineno, node.module, wanted)
    assert not missing, "\n".join(missing)


def _missing_in_package(script: str, line: int, module_name: str, wanted: list[str]) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return [f"{script}:{line}: from {module_name}: {e}"]
    missing = []
    for name in wanted:
        if hasattr(module, name):
            continue
        try:  # a submodule: `from clipengine.image import gpu_decode`
            importlib.import_module(f"{module_name}.{name}")
        except ImportError:
            missing.append(f"{script}:{line}: {module_name} has no {name}")
    return missing
