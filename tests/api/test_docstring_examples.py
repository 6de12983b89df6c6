"""The public API's docstring examples run as written (`python -m doctest`, `pytest --doctest-modules`)
or are marked `# doctest: +SKIP` where they need downloaded weights and image files."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "clipengine", "clipengine.api", "clipengine.zeroshot", "clipengine.report", "clipengine.types",
    "clipengine.index.index",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, report=False, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_dir_lists_the_lazy_names() -> None:
    """dir(clipengine) (and IPython's tab completion) missed load, ClipModel, Index and tokenize,
    which `__getattr__` imports on first use."""
    import clipengine

    assert {"load", "ClipModel", "Index", "tokenize", "__version__"} <= set(dir(clipengine))
