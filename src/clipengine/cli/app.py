"""The `clipengine` command: one typer app; each sub-command lives in its own module under cli/."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import typer

from ..errors import ClipEngineError
from ..extras import install_hint

__all__ = ["app", "main"]

app = typer.Typer(
    name="clipengine",
    help="CLIP from checkpoint to fast, verified inference: predict, export, embed, eval, search, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`. Imported here (not lazily per call) so --help lists them all;
# the modules themselves import heavy dependencies (torch, onnxruntime, faiss) only inside commands.
_COMMAND_MODULES = (
    "predict",
    "models_cmd",
    "export",
    "embed",
    "bench",
    "eval_cmd",
    "index_cmd",
    "serve_cmd",
)

_state = {"verbose": False}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue  # command not built yet
            raise
        module.register(app)


_register_all()


def _click_exception_types() -> tuple[type[BaseException], ...]:
    """typer >= 0.29 bundles its own click; older typer uses the click package. Catch both."""
    types: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(types)


# What the user can do about the OS errors a run most often meets; others get the OS's words alone.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.EACCES: "check its permissions or use another path",
    errno.EPERM: "check its permissions or use another path",
}


def _os_error_line(e: OSError) -> str:
    """One line for an OS error (disk full, read-only folder, unreadable file): the path and the reason.

    A temp file of `files.atomic_path` is named after the file it was to become (".run.json.x1y2z3a4.tmp"
    -> "run.json"): the user knows that name, not the temp one.
    """
    from ..files import temp_target

    paths = []
    for name in (e.filename, e.filename2):
        if name is None:
            continue
        text = os.fsdecode(name)
        final = temp_target(os.path.basename(text))
        paths.append(os.path.join(os.path.dirname(text), final) if final else text)
    reason = e.strerror or str(e)
    fix = _OS_ERROR_FIXES.get(e.errno or 0)
    if not paths:  # nothing names what failed: say where the details are
        return f"{reason}{f'; {fix}' if fix else ''} (run with -v for the traceback)"
    return f"{' -> '.join(paths)}: {reason}" + (f"; {fix}" if fix else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; maps ClipEngineError, OSError and a missing optional dependency to a one-line message
    and exit code 1 (2 for usage)."""
    click_errors = _click_exception_types()
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except ClipEngineError as e:
        if _state["verbose"]:
            raise
        typer.echo(f"error: {e}", err=True)
        return 1
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            code = getattr(e, "code", 0)
        return int(code or 0)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    except click_errors as e:  # usage errors (bad option values, missing arguments)
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    except ModuleNotFoundError as e:  # an optional dependency this command needs: name its extra
        hint = install_hint(e)
        if hint is None or _state["verbose"]:
            raise
        typer.echo(f"error: {hint}", err=True)
        return 1
    except OSError as e:  # disk full, read-only output, unreadable input: the user's to fix, not a bug
        if _state["verbose"]:
            raise
        typer.echo(f"error: {_os_error_line(e)}", err=True)
        return 1
    if isinstance(result, int) and result:
        # typer returns 130 (instead of raising) when a command was interrupted with Ctrl-C.
        if result == 130:
            typer.echo("interrupted", err=True)
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
