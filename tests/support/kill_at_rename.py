"""Run clipengine CLI commands that SIGKILL themselves at a chosen rename: deterministic crash points.

Usage: python kill_at_rename.py JOBS_JSON [WORKERS]

JOBS_JSON is a list of jobs ``{"root": DIR, "points": ["5", "3+", ...], "argv": [...]}``. For each
point of a job, in order, a child process runs ``clipengine ARGV`` and kills itself (SIGKILL) at its
N-th rename (os.replace / os.rename, which every atomic write and folder swap ends with) whose
target is under ROOT: "5" just before the 5th (its temp file is written and synced, the rename not
done), "5+" just after it, "0" never. Every file clipengine publishes appears through such a rename,
so sweeping N visits each state a crash can leave a folder in; several points in one job are a run
killed, resumed and killed again. Up to WORKERS jobs (default 1) run at once. Prints one JSON
line: per job, per point, {"killed", "exit", "renames"}.

The children are forked from this process after torch and the CLI are imported (and before any
torch computation, so no thread pool is copied half-way): each crash costs the work, not the
interpreter and torch start-up (seconds on a busy machine).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _hooked(real: Callable[..., Any], root: str, at: int, after: bool, seen: list[int]) -> Callable[..., Any]:
    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if not os.path.abspath(dst).startswith(root + os.sep):
            return real(src, dst, *args, **kwargs)
        seen[0] += 1
        if seen[0] == at and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if seen[0] == at and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return rename


def _child(root: str, point: str, argv: list[str], report: int) -> None:
    """Run the CLI with the hook; write the rename count to `report` (reached only if not killed)."""
    from clipengine.cli.app import main as cli

    at, after = int(point.rstrip("+")), point.endswith("+")
    seen = [0]
    os.replace = _hooked(os.replace, root, at, after, seen)
    os.rename = _hooked(os.rename, root, at, after, seen)
    code = cli(argv)
    os.write(report, str(seen[0]).encode())
    sys.stdout.flush()
    os._exit(code)


def _start(root: str, point: str, argv: list[str]) -> tuple[int, int]:
    """Fork the child for one point; its pid and the read end of its report pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        os.close(read)
        try:
            _child(root, point, argv, write)
        finally:
            os._exit(70)
    os.close(write)
    return pid, read


def _result(status: int, read: int) -> dict[str, Any]:
    with os.fdopen(read) as f:  # the child has exited: its write end is closed
        renames = f.read()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "exit": os.waitstatus_to_exitcode(status), "renames": int(renames or -1)}


def _run_all(jobs: list[dict[str, Any]], workers: int) -> list[list[dict[str, Any]]]:
    """Run up to `workers` jobs at once; a job's points run one after the other (a run killed, then
    resumed), each job in its own root, so jobs cannot see each other. A crash point costs seconds
    of single-threaded work, so on a 2-core machine two at a time nearly halve the test's time."""
    results: list[list[dict[str, Any]]] = [[] for _ in jobs]
    waiting = list(range(len(jobs)))  # jobs whose next point has not started, in order
    running: dict[int, tuple[int, int]] = {}  # pid -> (job, read end of its report pipe)
    while waiting or running:
        while waiting and len(running) < workers:
            j = waiting.pop(0)
            job = jobs[j]
            pid, read = _start(os.path.abspath(job["root"]), job["points"][len(results[j])], job["argv"])
            running[pid] = (j, read)
        pid, status = os.wait()
        j, read = running.pop(pid)
        results[j].append(_result(status, read))
        if len(results[j]) < len(jobs[j]["points"]):
            waiting.insert(0, j)  # its next point: the resume of the run just killed
    return results


def main() -> None:
    import importlib

    # Imported once here, not in every child; torch._dynamo is what building a model on the meta
    # device imports (3 s).
    for module in ("torch._dynamo", "clipengine.cli.app", "clipengine.models.load"):
        importlib.import_module(module)

    jobs = json.loads(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    results = _run_all(jobs, workers)
    sys.stdout.flush()
    print("\n" + json.dumps(results))  # on a line of its own, whatever the children printed


def run_jobs(jobs: list[dict[str, Any]], timeout: float = 300) -> list[list[dict[str, Any]]]:
    """Run `jobs` (see the module docstring) in one subprocess; the results, per job and point."""
    import subprocess

    # One thread per torch process and one process per core (4 at most, for memory): the runs are
    # tiny, and the test process only waits for them.
    workers = min(len(os.sched_getaffinity(0)), 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(jobs), str(workers)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: list[list[dict[str, Any]]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


if __name__ == "__main__":
    main()
