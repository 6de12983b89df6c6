"""The public API's docstring examples run as written (`python -m doctest`, `pytest --doctest-modules`)
or are marked `# doctest: +SKIP` where they need downloaded weights and image files."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["clipengine", "clipengine.api", "clipengine.zeroshot", "clipengine.report", "clipengine.types"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, report=False, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
