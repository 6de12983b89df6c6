"""The `clipengine` command: one typer app; each sub-command lives in its own module under cli/."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import typer

from ..errors import ClipEngineError

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; maps ClipEngineError to a one-line message and exit code 1 (2 for usage)."""
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
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
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
