"""Embed on a Ray cluster: a Ray Data job mapping partitions through an actor pool into the local run's shards.

Same partitions (`pipeline.sources.partitions`), same writer (`pipeline.run.run_partition` +
`pipeline.sinks.ShardSink`), so a Ray output folder is byte-for-byte the layout of a local run and
either engine can resume the other's. Ray is imported only inside functions (`clipengine[ray]`).

Each Ray Data row is one partition: its id and its (id, source) pairs as JSON. `map_batches` sends
rows through a pool of `_PartitionEmbedder` actors; each actor builds its backend ONCE from a
picklable factory or a plain-data model spec (never a live model), decodes in one process of its
own (a crashing decoder ends it, not the actor) and writes its shard. Partitions whose shard is
already complete are filtered out on the driver, so a rerun after an interruption computes only
what is missing. The output folder must be visible to every node (local disk on one machine; NFS /
a shared mount on a cluster).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendError, IndexMismatchError, InputError
from ..pipeline.embed import LazyBackend
from ..pipeline.run import RunStats, run_partition, unfinished_partitions, warn_stale_shards
from ..pipeline.run_lock import exclusive_output
from ..pipeline.run_settings import check_compatible, model_files
from ..pipeline.sinks import RUN_FILE, ShardSink, atomic_write_json, read_run_info
from ..pipeline.sources import check_unique_ids, partitions
from ..types import ImageItem
from .ray_sources import _encode, list_source
from .tar_members import TarMemberPool

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig
    from ..types import Backend

__all__ = ["ModelSpec", "SpecBackendFactory", "embed_with_ray", "list_source"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelSpec:
    """A model as plain data, rebuilt inside each actor with `clipengine.load`."""

    name: str  # registry name, checkpoint file or ONNX export folder
    pretrained: str | None = None  # weights tag
    checkpoint: str | None = None  # checkpoint file; overrides `name` as the thing loaded
    backend: str = "torch"  # torch | onnx
    precision: str = "fp32"
    device: str = "cpu"  # "cuda" for GPU actors (num_gpus > 0)


@dataclass(frozen=True)
class SpecBackendFactory:
    """Picklable zero-argument factory: `clipengine.load(spec...).backend`."""

    spec: ModelSpec

    def __call__(self) -> Backend:
        from ..api import load

        s = self.spec
        return load(s.checkpoint or s.name, pretrained=s.pretrained, backend=s.backend, device=s.device,
                    precision=s.precision).backend  # fmt: skip


# ---------------------------------------------------------------------------------------------- sources
# ---------------------------------------------------------------------------------------------- actors
class _PartitionEmbedder:
    """Ray Data actor UDF: loads the backend once, then embeds and writes one shard per input row."""

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        preprocess_cfg: dict[str, Any],
        out_dir: str,
        dtype: str,
        batch_size: int,
        expected_dim: int | None,
        fast_decode: bool = False,
        expected_precision: str | None = None,
    ) -> None:
        self.backend: Backend | None = None
        self.load_s, self.init_error = 0.0, b""
        t0 = time.perf_counter()
        try:
            self.backend = LazyBackend(backend_factory).get()  # the one model load of this actor
            if expected_dim is not None and self.backend.embed_dim != expected_dim:
                raise IndexMismatchError(
                    f"{out_dir} holds {expected_dim}-d embeddings but the model makes {self.backend.embed_dim}-d"
                )
            precision = getattr(self.backend, "precision", None)
            if expected_precision is not None and precision is not None and precision != expected_precision:
                # an export folder is one model label at fp32 and int8: never two precisions in one folder
                raise IndexMismatchError(
                    f"{out_dir} holds embeddings made with precision={expected_precision!r}, but this run "
                    f"uses precision={precision!r}; use another output folder, delete {out_dir}, or use "
                    f"--precision {expected_precision}"
                )
        except Exception as e:  # raised as itself on the driver; failing here, Ray gave a remote traceback
            self.init_error = _pickled(e)
            # A model that loaded but does not match the folder (its embed_dim or precision) embeds
            # nothing: with the backend kept, each partition was written before the driver raised.
            self.backend = None
        self.load_s = time.perf_counter() - t0
        self.sink = ShardSink(out_dir, dtype)
        self.cfg, self.batch_size, self.fast_decode = preprocess_cfg, batch_size, fast_decode
        # One decode process, as the local engine's workers: a file that crashes the decoder (a
        # segfault, the OOM killer) ends that process, not the actor, and becomes its Failure
        # (`batching.settle`). Decoded in the actor, it killed the actor, and Ray restarted the
        # actor and retried the partition forever. It reads tar members itself, a chunk at a time
        # (`tar_members`): the actor never holds a partition's bytes.
        self.decoder = TarMemberPool(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats_out: list[str] = []
        errors: list[str] = []
        for pid, pairs, retry in zip(batch["partition_id"], batch["items"], batch["retry"], strict=True):
            stats_out.append("")
            errors.append("")
            if self.backend is None:
                continue  # the constructor's error (`init_error`) is this row's
            try:
                stats = run_partition(
                    [ImageItem(i, s) for i, s in json.loads(pairs)], self.backend, self.sink, partition_id=int(pid),
                    preprocess_cfg=self.cfg, batch_size=self.batch_size, executor=self.decoder,
                    fast_decode=self.fast_decode, skip_complete=not retry,  # retried: its shard is complete
                )  # fmt: skip
            except Exception as e:  # returned for the driver to raise: Ray would keep only a remote traceback
                errors[-1] = " ".join(f"{type(e).__name__}: {e}".split())
                continue
            stats.load_s, self.load_s = self.load_s, 0.0  # charge the model load to the first partition
            stats_out[-1] = json.dumps(asdict(stats))
        n = len(stats_out)
        return {
            "partition_id": np.asarray(batch["partition_id"]),
            "stats": np.asarray(stats_out, dtype=object),
            "embed_dim": np.full(n, self.backend.embed_dim if self.backend is not None else 0),
            "precision": np.asarray([str(getattr(self.backend, "precision", None) or "")] * n, dtype=object),
            "error": np.asarray(errors, dtype=object),
            "init_error": np.asarray([self.init_error] * n, dtype=object),
        }


def _pickled(error: Exception) -> bytes:
    """`error` as bytes the driver can raise again; a one-line BackendError if it does not pickle."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)  # an exception class with a custom __init__ may not come back
        return data
    except Exception:
        return pickle.dumps(BackendError(" ".join(f"{type(error).__name__}: {error}".split())))


# ---------------------------------------------------------------------------------------------- driver
_CONNECT_TIMEOUT_S = 10.0  # a cluster that does not accept a TCP connection in this time is unreachable
# Runs of one partition on an actor that died meanwhile (a preempted node, the OOM killer, a crash in
# the model runtime) before the job fails. Ray Data's default is no limit: a partition that kills
# every actor it reaches (a model too big for its GPU) had the job restart actors for ever.
_PARTITION_RETRIES = 2


def _ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and should shut it down).

    Raises:
        BackendError: the address is unreachable or not one Ray understands (one line, no traceback).
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        if address is None:
            if os.environ.get("RAY_ADDRESS"):  # ray.init joins it: tried for minutes if nothing listens
                _check_reachable(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:  # what ray.init raises for a bad address
        env = os.environ.get("RAY_ADDRESS")
        where = f"the Ray cluster at {address}" if address else f"the Ray cluster at RAY_ADDRESS={env}" if env else "a local Ray instance"
        raise BackendError(f"cannot start or join {where}: {' '.join(str(e).split())}") from e
    return True


def _check_reachable(address: str, given_as: str = "--address") -> None:
    """Fail fast on a host:port that accepts no connection: `ray.init` retries such an address for ever.

    `given_as`: where the address came from, named in the error (the option, or RAY_ADDRESS)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return  # "auto", "local": Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BackendError(
            f"cannot reach the Ray cluster at {address} ({e}); check {given_as} (`ray status` on the head node)"
        ) from e


def _check_resources(**per_actor: float) -> None:
    """Refuse what Ray cannot reserve per actor (a fraction of one, or whole ones) before Ray starts:
    Ray Data raised its own ValueError for 1.5 GPUs, with a traceback, once the job was under way."""
    for name, value in per_actor.items():
        value = float(value)  # an int has no is_integer() before Python 3.12
        if not (math.isfinite(value) and value >= 0 and (value <= 1 or value.is_integer())):
            raise InputError(
                f"{name}={value:g} per actor: Ray reserves 0, a fraction of one (e.g. 0.5) or a whole number"
            )


def _as_factory(
    model: Callable[[], Backend] | ModelSpec | Mapping[str, Any], num_gpus: float
) -> Callable[[], Backend]:
    if isinstance(model, Mapping):
        fields = dict(model)
        if num_gpus > 0:
            fields.setdefault("device", "cuda")
        model = ModelSpec(**fields)
    if isinstance(model, ModelSpec):
        return SpecBackendFactory(model)
    if not callable(model):
        raise TypeError(f"model must be a backend factory or a model spec, got {type(model).__name__}")
    return model


def embed_with_ray(
    source: str | Path | Sequence[ImageItem | str | Path],
    out_dir: str | Path,
    backend_factory: Callable[[], Backend] | ModelSpec | Mapping[str, Any],
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    *,
    model: str | None = None,
    address: str | None = None,
    num_actors: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    batch_size: int = 32,
    shard_size: int = 1000,
    dtype: str = "float16",
    path_column: str = "path",
    source_label: str | None = None,
    fast_decode: bool = False,
    retry_failed: bool = False,
    progress: Callable[[int], None] | None = None,
    **compat: Any,
) -> RunStats:
    """Embed `source` into `out_dir` with a Ray Data job; same shards, run.json and failures as `embed_folder`.

    Args:
        source: folder, .txt file list, .parquet with a `path_column`, WebDataset .tar shard(s), or ImageItems.
        out_dir: output folder (shared storage on a multi-node cluster).
        backend_factory: a picklable zero-argument backend factory (e.g. cli.embed.BackendFactory), a
            ModelSpec, or a dict of ModelSpec fields. Each actor builds its backend from it once.
        preprocess_cfg: the model's PreprocessConfig (or its dict).
        model: the model's name, recorded in run.json (what resume and `clipengine index` compare).
        address: None starts a local Ray instance (unless one is running), "auto" joins the local
            cluster, "ray://host:10001" a remote one.
        num_actors: actor pool size. num_cpus / num_gpus: resources per actor.
        batch_size: images per backend call. shard_size: images per partition (must match a resumed run).
        dtype: "float16" or "float32" on disk.
        retry_failed: recompute the complete shards that list failures too (files fixed since).
        progress: called with the number of items of each finished partition.
        **compat: `workers=` is accepted (and ignored) for call compatibility with `embed_folder`;
            decoding happens inside each actor.

    Returns:
        RunStats summed over partitions (`wall_s` is the driver's elapsed time).

    Raises:
        IndexMismatchError: out_dir holds a run with another model, dim, dtype or shard size.
        OutputBusyError: another run is writing into out_dir (`pipeline.run_lock`), before Ray starts.
        DatasetError: unreadable source, or an id listed twice. BackendError: the Ray job failed.
        InputError: num_cpus / num_gpus that Ray cannot reserve (negative, or above 1 and not whole).
    """
    t_start = time.perf_counter()
    unknown = set(compat) - {"workers"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    _check_resources(num_cpus=num_cpus, num_gpus=num_gpus)
    out = Path(out_dir)
    items = list_source(source, path_column)
    check_unique_ids(items)  # before Ray starts: the actors see one partition each
    parts = partitions(items, shard_size)
    cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else preprocess_cfg.to_dict()
    sink = ShardSink(out, dtype)
    info: dict[str, Any] = {
        "model": model, "model_files": model_files(model), "embed_dim": None, "dtype": dtype,
        "shard_size": shard_size,
        "batch_size": batch_size, "preprocess": cfg, "partitions": len(parts), "images": len(items),
        "source": str(Path(source).resolve()) if isinstance(source, (str, Path)) else source_label,
        "engine": "ray", "status": "running", "fast_decode": fast_decode,
        "gpu_decode": False, "gpu_decoder": None,  # actors decode on the CPU
    }  # fmt: skip
    with exclusive_output(out):  # one run at a time into a folder, as the local engine (`run_lock`)
        previous = read_run_info(out)
        if previous is not None:
            check_compatible(out, previous, info)  # the local engine's rule: never mix runs in one folder
            info["embed_dim"] = previous.get("embed_dim")
            info["precision"] = previous.get("precision")  # the actors check theirs against it
        out.mkdir(parents=True, exist_ok=True)
        sink.clean_temp_files()
        atomic_write_json(out / RUN_FILE, info)

        total = RunStats()
        stale: list[tuple[int, str]] = []  # finished shards that cannot be kept: one warning, below
        todo = unfinished_partitions(parts, sink, info["embed_dim"], retry_failed, stale)
        # Complete shards recomputed for `retry_failed`: the actors must not keep them as complete.
        retried = {p.id for p in todo if retry_failed and sink.has_failures(p.id)}
        todo_ids = {p.id for p in todo}
        for p in parts:
            if p.id not in todo_ids:
                total.add(RunStats(images=len(p.items), skipped=len(p.items), shards_skipped=1))
                if progress is not None:
                    progress(len(p.items))
        warn_stale_shards(stale)
        log.info("ray embed: %d partitions, %d already complete", len(parts), len(parts) - len(todo))
        if todo:
            _run_job(todo, out, _as_factory(backend_factory, num_gpus), cfg, info, total, progress,
                     address=address, num_actors=num_actors, num_cpus=num_cpus, num_gpus=num_gpus,
                     dtype=dtype, batch_size=batch_size, fast_decode=fast_decode, retried=frozenset(retried))  # fmt: skip
        total.failed_total = sink.write_failures(len(parts))
        total.wall_s = time.perf_counter() - t_start
        info.update(status="complete", counts=total.counts(), timings=total.to_dict())
        if not total.processed and previous is not None and "timings" in previous:
            info["timings"] = previous["timings"]  # a pure resume keeps the timings of the run that did the work
        atomic_write_json(out / RUN_FILE, info)
        return total


def _run_job(
    todo: Sequence[Any],
    out: Path,
    factory: Callable[[], Backend],
    cfg: dict[str, Any],
    info: dict[str, Any],
    total: RunStats,
    progress: Callable[[int], None] | None,
    *,
    address: str | None,
    num_actors: int,
    num_cpus: float,
    num_gpus: float,
    dtype: str,
    batch_size: int,
    fast_decode: bool = False,
    retried: frozenset[int] = frozenset(),
) -> None:
    """Submit the missing partitions as one Ray Data job and fold each finished partition into `total`.

    `retried`: ids of complete partitions to compute again (`retry_failed`), which the actors must
    not skip as complete."""
    import ray
    import ray.data

    started = _ensure_ray(address)  # a local instance gets every core; the actor pool size caps use
    try:
        gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]
        if num_gpus > gpus:  # no actor could ever start: Ray Data would wait for one for ever
            raise BackendError(
                f"{num_gpus:g} GPU(s) per actor, but the Ray cluster has {gpus:g}; use a cluster with GPUs "
                "(an autoscaling one: start a GPU node first) or no GPUs per actor"
            )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the caller's `progress` callback reports per partition
        ctx.print_on_execution_start = False
        rows = [
            {"partition_id": p.id, "items": json.dumps([[i.id, _encode(i)] for i in p.items]), "retry": p.id in retried}
            for p in todo
        ]
        with warnings.catch_warnings():
            # `max_task_retries` has no named parameter in map_batches (Ray 2.60), so it goes in the
            # deprecated **ray_remote_args, which warns; it is what bounds the retries (`_PARTITION_RETRIES`).
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                _PartitionEmbedder,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, len(rows)))),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_task_retries=_PARTITION_RETRIES,
                fn_constructor_kwargs={
                    "backend_factory": factory, "preprocess_cfg": cfg, "out_dir": str(out.resolve()),
                    "dtype": dtype, "batch_size": batch_size, "expected_dim": info["embed_dim"],
                    "fast_decode": fast_decode, "expected_precision": info.get("precision"),
                },
            )  # fmt: skip
        for row in ds.iter_rows():
            if row["init_error"]:  # an actor could not load the model: as a load on the driver would raise
                raise pickle.loads(row["init_error"])
            if row["error"]:
                raise BackendError(
                    f"Ray embedding job failed on partition {row['partition_id']}: {row['error']}"
                )
            stats = RunStats(**json.loads(row["stats"]))
            total.add(stats)
            dim = int(row["embed_dim"])
            if info["embed_dim"] is None or (info.get("precision") is None and row["precision"]):
                info["embed_dim"] = info["embed_dim"] or dim
                info["precision"] = info.get("precision") or row["precision"] or None
                atomic_write_json(out / RUN_FILE, info)
            if progress is not None:
                progress(stats.images)
    except ray.exceptions.RayError as e:
        reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())  # one line, no terminal colours
        if isinstance(e, ray.exceptions.RayActorError):
            reason = (
                f"an actor process died running one partition {_PARTITION_RETRIES + 1} times (out of memory, "
                f"or a crash in the model runtime? see the Ray logs): {reason}"
            )
        raise BackendError(f"Ray embedding job failed: {reason}") from e
    finally:
        if started:
            ray.shutdown()
