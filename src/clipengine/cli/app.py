"""The `clipengine` command: one typer app; each sub-command lives in its own module under cli/."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from ..errors import ClipEngineError
from ..extras import install_hint

__all__ = ["app", "main"]

# Exit status when the reader of stdout went away (`clipengine models | head -1`): 128 + SIGPIPE,
# what the shell reports for `yes | head -1` (`set -o pipefail` sees it); quiet, and apart from the
# 1 of a real error. (signal.SIGPIPE does not exist on Windows, hence the number.)
EXIT_STDOUT_CLOSED = 128 + 13


class _StdoutClosed(Exception):
    """EPIPE from stdout, whose reader has gone (click would turn any EPIPE into a silent exit 1)."""


class _InternalBrokenPipe(Exception):
    """EPIPE from anything else (a pipe or connection to a worker process that died): a real error."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone: it polls as an error (POSIX)."""
    if not hasattr(select, "poll"):
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file (test capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _expand_home(value: Any) -> Any:
    """`~/x` as the shell would have expanded it unquoted: `--output=~/x` and `"~/my photos"` reach us as
    they are, and `~/x` made a folder named `~` in the working directory (or 'does not exist')."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_expand_home(item) for item in value)
    return value


def _expand_home_in_paths(command: Any) -> None:
    """Expand `~` in every path parameter of `command` and its sub-commands, before typer checks the
    path (exists=, file_okay=): the library already expands it in model names and file lists."""
    for param in command.params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or not descriptor.is_path or getattr(param, "_expands_home", False):
            continue
        process_value = param.process_value
        param.process_value = lambda ctx, value, process=process_value: process(ctx, _expand_home(value))
        param._expands_home = True
    for sub in getattr(command, "commands", {}).values():
        _expand_home_in_paths(sub)


class _Group(TyperGroup):
    """The root group. click (typer's copy included) catches every OSError with errno EPIPE raised
    by a command, swaps sys.stdout/stderr for wrappers and exits 1 without a word, even outside
    standalone mode: a worker's broken pipe then looked like `| head`. Every command runs through
    this `invoke` (sub-groups too), so the error is sorted here, before click sees it."""

    def invoke(self, ctx: Any) -> Any:  # click's Context (typer bundles its own click)
        if ctx.parent is None:
            _expand_home_in_paths(self)
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            if _stdout_closed():
                raise _StdoutClosed from e
            raise _InternalBrokenPipe(e) from e


app = typer.Typer(
    cls=_Group,
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


class _PrintableFormatter(logging.Formatter):
    """Log lines with the message's control characters escaped: messages name files, and a newline in
    a file name split the line, a terminal escape reached the terminal raw (tracebacks are kept as
    they are)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().formatMessage(record))


def _print_version(asked: bool) -> None:
    """`clipengine --version`, which a new user tries first: click offered '--verbose' for it."""
    if asked:
        from .. import __version__

        typer.echo(f"clipengine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["verbose"] = verbose
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])


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
    errno.ENOTDIR: "a folder on that path is a file; use another path",
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
    if e.errno == errno.ENOTDIR and reason != os.strerror(errno.ENOTDIR):
        fix = None  # files.py's own words already say it ("a file, not a folder: ...")
    if not paths:  # nothing names what failed: say where the details are
        return f"{reason}{f'; {fix}' if fix else ''} (run with -v for the traceback)"
    return f"{' -> '.join(paths)}: {reason}" + (f"; {fix}" if fix else "")


def _broken_pipe_line(e: OSError) -> str:
    """A broken pipe that is not stdout's: a process or connection clipengine wrote to had closed."""
    what = "a pipe or connection clipengine was writing to had closed (a worker process ended?)"
    return f"{_os_error_line(e) if e.filename else e.strerror or e}: {what} (run with -v for the traceback)"


def _hint_misplaced_verbose(error: Any) -> None:
    """`clipengine predict ... -v` said only "No such option: -v" of the option README names: say where it goes."""
    option = getattr(error, "option_name", None)
    ctx = getattr(error, "ctx", None)
    if option not in ("-v", "--verbose") or ctx is None or ctx.parent is None:
        return
    root = ctx.find_root().command_path  # "clipengine", or "python -m clipengine"
    command = ctx.command_path.removeprefix(root).strip()
    error.message = f"{error.message}; {option} goes before the command: {root} {option} {command} ..."


def _quiet_exit() -> int:
    """stdout's reader has gone: point stdout at os.devnull so that the interpreter's final flush of
    what is still buffered does not fail ("Exception ignored ... BrokenPipeError", exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_STDOUT_CLOSED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; maps ClipEngineError, OSError and a missing optional dependency to a one-line message
    and exit code 1 (2 for usage). stdout closed by its reader (`| head`) is a quiet exit 141; any
    other broken pipe (to a worker process, say) is an error line like the other OS errors."""
    click_errors = _click_exception_types()
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except _StdoutClosed:
        return _quiet_exit()
    except _InternalBrokenPipe as e:
        if _state["verbose"]:
            raise e.error from None
        typer.echo(f"error: {_broken_pipe_line(e.error)}", err=True)
        return 1
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
        _hint_misplaced_verbose(e)
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
    try:  # what is still buffered would meet a closed pipe at exit: "Exception ignored ..."
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_exit()
    if isinstance(result, int) and result:
        # typer returns 130 (instead of raising) when a command was interrupted with Ctrl-C.
        if result == 130:
            typer.echo("interrupted", err=True)
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
