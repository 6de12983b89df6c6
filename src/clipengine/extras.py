"""Which `pip install "clipengine[EXTRA]"` provides each optional dependency.

Optional dependencies are imported inside the functions that need them, so a missing one surfaces as
a ModuleNotFoundError deep in a run; `install_hint` turns it into the one line a user can act on.
"""

from __future__ import annotations

__all__ = ["EXTRA_FOR_MODULE", "install_hint"]

# Top-level import name -> the extra (pyproject.toml) that installs it. tests/test_packaging.py checks
# that each extra's requirements really include the distribution behind every name listed here.
EXTRA_FOR_MODULE = {
    "torch": "torch",
    "safetensors": "torch",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "onnxscript": "export",
    "onnxconverter_common": "export",
    "openvino": "openvino",
    "fastapi": "serve",
    "starlette": "serve",
    "pydantic": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "uvicorn": "serve",
    "h11": "serve",  # serve/protocol.py (uvicorn's HTTP/1.1 parser; declared, as it is imported directly)
    "faiss": "index",
    "ray": "ray",
    "pyarrow": "ray",
    "sklearn": "eval",
    "matplotlib": "eval",
}

# What to add to the hint: torch is the one dependency a whole second way of running replaces.
_NOTES = {
    "torch": ' (to export: "clipengine[export]"); an ONNX export folder runs without it '
    "(--model/--engine DIR, or clipengine.load(DIR))",
}


def install_hint(error: ModuleNotFoundError) -> str | None:
    """'torch is not installed: pip install "clipengine[torch]"' for an optional dependency, else None.

    None for anything else (a module of clipengine itself, a required dependency): that is a broken
    install or a bug, and its traceback is the useful report.
    """
    root = (error.name or "").partition(".")[0]
    extra = EXTRA_FOR_MODULE.get(root)
    if extra is None:
        return None
    return f'{root} is not installed: pip install "clipengine[{extra}]"' + _NOTES.get(root, "")
