"""One run at a time per output folder: a run while another process holds OUT/.clipengine.lock is
refused at once, naming the holder's pid; once the holder dies (the OS drops its flock), a run goes on.

Two runs into one folder both passed the resume check before either wrote run.json (or loaded its
model), then wrote each other's shards: a 16-d model's and a 32-d model's shards in one folder
under one run.json, both runs reporting success.

The holder is another process taking the lock the way a run does (flock on the lock file, its pid
written in it), so the tests do not depend on this process's own lock bookkeeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from clipengine.errors import OutputBusyError
from clipengine.pipeline.run import embed_folder
from clipengine.pipeline.run_lock import LOCK_FILE, exclusive_output
from clipengine.pipeline.sinks import ShardSink, read_embeddings, shard_stems

fcntl = pytest.importorskip("fcntl")  # folders are locked where the OS has flock

# Another run in the middle of its work: holds the folder's lock until its stdin closes (or it is killed).
_HOLDER = """
import fcntl, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lock of ``tmp_path/out`` (killed at the end if still alive)."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "out"), LOCK_FILE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
            yield proc
        finally:
            proc.kill()
            proc.wait(30)


def _embed(source: Path, out: Path, factory, preprocess_cfg):  # type: ignore[no-untyped-def]
    return embed_folder(source, out, factory, preprocess_cfg, model="fake", shard_size=10, batch_size=4, workers=0)


def test_a_run_into_a_folder_another_process_is_writing_is_refused_at_once(
    tmp_path: Path, image_folder: Path, preprocess_cfg, fake_factory, holder: subprocess.Popen[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    with pytest.raises(OutputBusyError) as caught:
        _embed(image_folder, out, fake_factory, preprocess_cfg)
    assert str(caught.value).startswith(f"{out} is being written by another clipengine run (pid {holder.pid})")
    assert fake_factory.built == []  # no model loaded
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no run.json, no shard of its own


def test_after_the_holder_dies_a_run_proceeds(
    tmp_path: Path, image_folder: Path, preprocess_cfg, fake_factory, holder: subprocess.Popen[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    holder.send_signal(signal.SIGKILL)  # a crashed run: nothing released the lock but the OS
    holder.wait(30)
    stats = _embed(image_folder, out, fake_factory, preprocess_cfg)
    assert stats.embedded == 25
    ids, vectors, meta = read_embeddings(out)
    assert len(ids) == 25 and vectors.shape == (25, 8) and meta["status"] == "complete"
    assert (out / LOCK_FILE).read_bytes() == b""  # released: no pid left for a later refusal to name


def test_the_ray_engine_is_refused_too_before_ray_starts(
    tmp_path: Path, image_folder: Path, preprocess_cfg, fake_factory, holder: subprocess.Popen[str]
) -> None:  # type: ignore[no-untyped-def]
    from clipengine.distributed.ray import embed_with_ray

    with pytest.raises(OutputBusyError, match=rf"\(pid {holder.pid}\)"):
        embed_with_ray(image_folder, tmp_path / "out", fake_factory, preprocess_cfg, model="fake", shard_size=10)
    assert not (tmp_path / "out" / "run.json").exists()


def test_the_cli_refuses_before_loading_the_model(
    tmp_path: Path, image_folder: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from clipengine.cli import model_options
    from clipengine.cli.app import main

    loads: list[object] = []
    monkeypatch.setattr(model_options, "load_clip", lambda opts: loads.append(opts) or SimpleNamespace())
    out = tmp_path / "out"
    code = main(["embed", str(image_folder), "-o", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and loads == []
    assert err.startswith(f"error: {out} is being written by another clipengine run (pid {holder.pid});"), err
    assert "Traceback" not in err


def test_the_cli_holds_the_folder_through_its_last_write(
    tmp_path: Path, image_folder: Path, preprocess_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The CLI takes the lock before its model load and `embed_folder` takes it again inside (the same
    thread: allowed); the fidelity line goes into run.json under it too; another process is kept out
    the whole time."""
    import pipeline_fakes

    from clipengine.cli import model_options
    from clipengine.cli.app import main

    out = tmp_path / "out"
    seen: list[int] = []

    class Probe(pipeline_fakes.FakeBackend):
        def encode_images(self, pixels):  # type: ignore[no-untyped-def]
            seen.append(_other_process_can_lock(out))
            return super().encode_images(pixels)

    clip = SimpleNamespace(backend=Probe(embed_dim=8, image_size=32), preprocess_cfg=preprocess_cfg, name="fake")
    monkeypatch.setattr(model_options, "load_clip", lambda opts: clip)
    assert main(["embed", str(image_folder), "-o", str(out), "--workers", "0", "--no-progress"]) == 0
    assert seen and not any(seen)  # locked while embedding
    assert _other_process_can_lock(out)  # released at the end
    assert len(read_embeddings(out)[0]) == 25


def _other_process_can_lock(out: Path) -> int:
    probe = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return int(subprocess.run([sys.executable, "-c", probe, str(out / LOCK_FILE)], capture_output=True).returncode == 0)


def test_another_thread_of_this_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with exclusive_output(out):
                pass
        except OutputBusyError as e:
            errors.append(e)

    with exclusive_output(out), exclusive_output(out):  # the same thread again: re-entrant
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(30)
    assert len(errors) == 1 and f"(pid {os.getpid()}, another thread)" in str(errors[0])
    with exclusive_output(out):  # released by the outer exit, not the inner one
        assert not _other_process_can_lock(out)
    assert _other_process_can_lock(out)


def test_the_lock_file_is_neither_a_shard_nor_a_temp_file(tmp_path: Path, image_folder: Path, preprocess_cfg,
                                                          fake_factory) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    out = tmp_path / "out"
    _embed(image_folder, out, fake_factory, preprocess_cfg)
    (out / "run.json").unlink()  # shard discovery without run.json lists the folder
    assert shard_stems(out) == [f"part-0000{i}" for i in range(3)]
    assert ShardSink(out).clean_temp_files() == 0 and (out / LOCK_FILE).is_file()
    stats = _embed(image_folder, out, fake_factory, preprocess_cfg)  # a resume over the lock file
    assert stats.skipped == 25 and stats.embedded == 0
