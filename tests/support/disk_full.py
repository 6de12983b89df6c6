"""A write that dies halfway, as on a full disk: for tests of atomic file writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def failing_savefig(self: object, fname: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for matplotlib's Figure.savefig: part of a file, then the error."""
    if hasattr(fname, "write"):
        fname.write(b"\x89PNG half")
    else:
        Path(fname).write_bytes(b"\x89PNG half")
    raise OSError(28, "No space left on device")
