"""`clipengine index build|add|info` and `clipengine search`: embeddings -> faiss index -> text/image queries.

The commands and their options; where their vectors come from is `index_sources`, which weights an
index's model names is `index_models`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from . import embed as embed_cli
from . import index_sources as sources
from . import model_options as mo
from .index_models import add_pretrained, check_model_files, mismatch_before_loading, with_default_tag
from .output_paths import check_output_folder
from .predict import shown_name

if TYPE_CHECKING:
    from ..index import Index

__all__ = ["register"]

log = logging.getLogger(__name__)

_KINDS_HELP = "auto (exact up to 100k vectors, IVF above), flat, ivf, ivfpq or hnsw."
_SOURCE_HELP = "An `clipengine embed` output folder, or images (folder / file list) to embed first."
# The kinds each structure option applies to. Another kind ignored it without a word, and the
# header recorded it as a parameter (`--kind flat --nlist 64` read "flat (exact; nlist=64)").
_KIND_OPTIONS = {"nlist": ("ivf", "ivfpq"), "nprobe": ("ivf", "ivfpq"), "ef_search": ("hnsw",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unused(kind: str, given: dict[str, int | None]) -> list[str]:
    return [name for name, value in given.items() if value is not None and kind not in _KIND_OPTIONS[name]]


def _refuse_unused(kind: str, given: dict[str, int | None]) -> None:
    """A kind given explicitly with an option it does not use, or an unknown kind: a usage error,
    before anything is embedded (an unknown kind was left to `Index.build`, after the model had
    been loaded and every image embedded)."""
    from ..index.ann import KINDS

    if kind != "auto" and kind not in KINDS:  # the words of `ann.choose_params`
        raise typer.BadParameter(f"unknown index kind {kind!r}; choose 'auto' or one of {', '.join(KINDS)}")
    for name in _unused(kind, given) if kind in KINDS else []:
        raise typer.BadParameter(
            f"{_flag(name)} applies to --kind {' / '.join(_KIND_OPTIONS[name])}, not {kind}"
        )


def _auto_options(n: int, dim: int, given: dict[str, int | None]) -> dict[str, int | None]:
    """For --kind auto: the options the kind it picks for `n` vectors uses; one warning names the
    others (the user could not know the kind in advance, so they are no usage error)."""
    from ..index.ann import choose_params

    picked = choose_params(n, dim, "auto").kind  # the same choice Index.build makes
    unused = _unused(picked, given)
    if unused:
        groups: dict[str, list[str]] = {}
        for name in unused:
            groups.setdefault(" / ".join(_KIND_OPTIONS[name]), []).append(_flag(name))
        why = "; ".join(
            f"{', '.join(flags)} ignored ({'they apply' if len(flags) > 1 else 'it applies'} to --kind {kinds})"
            for kinds, flags in groups.items()
        )
        log.warning("--kind auto chose %s for %d images: %s", picked, n, why)
    return {name: None if name in unused else value for name, value in given.items()}


def _opts(model: str | None, pretrained: str | None, checkpoint: Path | None, backend: str, precision: str,
          device: str, download: bool) -> mo.ModelOptions | None:  # fmt: skip
    if model is None and checkpoint is None:
        if pretrained is not None:  # it would be silently ignored: the recorded model is used
            raise typer.BadParameter(
                f"--pretrained {pretrained} needs --model: without one, the model is the one the embeddings record"
            )
        return None
    return mo.parse_model_options(
        model or "", pretrained, checkpoint, backend, precision, device, download
    )


def _echo_index(index: Index, path: Path, as_json: bool, **extra: Any) -> None:
    _echo_described(index.describe(), index.extra, path, as_json, **extra)


def _echo_described(
    described: dict[str, Any], header_extra: dict[str, Any], path: Path, as_json: bool, **extra: Any
) -> None:
    """An index's `Index.describe()` fields (and its header's extra "recall"), as a line or JSON."""
    from ..report import recall_line

    info = {"path": str(path), **described, **extra}
    if not info["exact"]:  # approximate: its measured recall (null: unmeasured), as a note too
        info["recall"] = header_extra.get("recall")
        typer.echo(recall_line(info["kind"], info["recall"]), err=True)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    how = "exact" if info["exact"] else "approximate"
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items() if k != "kind")
    typer.echo(f"{path}: {info['count']} images, {info['kind']} ({how}{'; ' + params if params else ''}), "
               f"dim {info['dim']}, model {info['model']}" + "".join(f", {k} {v}" for k, v in extra.items()))  # fmt: skip


def _refuse_unreadable(index: Index, index_path: Path, source: Path, emb_dir: Path, own_dir: bool,
                       as_json: bool) -> None:  # fmt: skip
    """`index add` of a source none of whose images is indexed or could be read: as `embed`, the
    summary, then an error (exit 1); the index stays as it was (no new generation recording the
    source as an image root). The add's own folder goes: a rerun resuming its complete shard would
    keep the failures instead of reading the files again."""
    failed = sources.report_failures(emb_dir, index, as_json, kept=not own_dir)
    if not failed:  # an embed folder whose failures the index holds by now: an add of nothing
        return
    _echo_index(index, index_path, as_json, added=0, skipped=0, **failed)
    if own_dir:
        sources.remove_add_dir(emb_dir)
    raise sources.nothing_readable(source, emb_dir, failed["failed"], "added", kept=not own_dir)


def _print_hits(hits: list[tuple[str, float]], index: Index, as_json: bool, query: str) -> None:
    rows = [
        {"rank": r + 1, "id": i, "path": str(index.resolve(i) or i), "score": round(s, 6)}
        for r, (i, s) in enumerate(hits)
    ]
    if as_json:
        typer.echo(json.dumps({"query": query, "model": index.model, "results": rows}, indent=2))
        return
    for row in rows:
        # width 7: -1.0000, so paths line up; a newline in a name must not split a hit
        typer.echo(f"{row['score']:7.4f}  {shown_name(str(row['path']))}")


_M = typer.Option(
    None, "--model", "-m", help="Model name or ONNX export folder (default: from run.json / the index)."
)
_P = typer.Option(None, "--pretrained", help="Pretrained weights tag.")
_C = typer.Option(None, "--checkpoint", help="Checkpoint file (overrides --model).")
_B = typer.Option("torch", "--backend", help="torch, onnx or openvino (onnx / openvino: export folder).")
_PR = typer.Option("fp32", "--precision", help=mo.PRECISION_OPT.help)
_D = typer.Option("cpu", "--device", help="cpu, cuda, ...")
_DL = typer.Option(False, "--download", help="Allow downloading weights that are not cached.")
_BATCH = typer.Option(32, "--batch", min=1, help="Images per backend call when embedding.")
_ENGINE = typer.Option("local", "--engine", help="Embedding engine for image folders: local or ray.")
_WORKERS = typer.Option(None, "--workers", min=0, help=embed_cli.WORKERS_HELP)
_EMB = typer.Option(
    None, "--embeddings", help="Where to keep the embeddings of the images (default: INDEX.embeddings)."
)
_ADD_EMB = typer.Option(
    None, "--embeddings", help="Where to keep the embeddings of the new images (default: a folder of "
    "their own beside the index, INDEX.embeddings-add-<hash of the new ids>, deleted once the add is "
    "saved; a folder named here is kept)."
)
_JSON = typer.Option(False, "--json", help="Print JSON.")
_RETRY = typer.Option(
    False, "--retry-failed", help="Reuse the kept embeddings but read the images that failed again "
    "(after fixing or replacing them); a plain rerun keeps their failures."
)
_SOURCE_ARG = typer.Argument(..., exists=True, help=_SOURCE_HELP)
_OUTPUT = typer.Option(..., "--output", "-o", help="Index folder to write (e.g. photos.index).")
_KIND = typer.Option("auto", "--kind", help=_KINDS_HELP)
_NLIST = typer.Option(None, "--nlist", min=1, help="IVF lists (default 4*sqrt(N)); --kind ivf / ivfpq only.")
_NPROBE = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query; ivf / ivfpq only.")
_EF = typer.Option(None, "--ef-search", min=1, help="HNSW search breadth; --kind hnsw only.")
_SEARCH_EF = typer.Option(
    None, "--ef-search", min=1, help="HNSW search breadth for this query (default: the index's); hnsw only."
)
_INDEX_ARG = typer.Argument(..., help="Index folder (e.g. photos.index).")
_QUERY = typer.Argument(None, help='Text query, e.g. "a dog on the beach".')
_IMAGE = typer.Option(None, "--image", exists=True, help="Search by this image instead.")
_K = typer.Option(10, "-k", "--top-k", min=1, help="Number of results.")
_VERIFY = typer.Option(
    False,
    "--verify",
    help="Also check every file against the sha256 its header records and load the faiss structure, "
    "as search, index add and serve do (reads the whole index; without it only the header is read).",
)


def register(app: typer.Typer) -> None:
    """Add `index build`, `index add`, `index info` and `search` to `app`."""
    index_app = typer.Typer(help="Build and extend a faiss image index.", no_args_is_help=True)
    app.add_typer(index_app, name="index")

    @index_app.command("build")
    def build_cmd(
        source: Path = _SOURCE_ARG,
        output: Path = _OUTPUT,
        kind: str = _KIND,
        nlist: int | None = _NLIST,
        nprobe: int | None = _NPROBE,
        ef_search: int | None = _EF,
        model: str | None = _M, pretrained: str | None = _P, checkpoint: Path | None = _C, backend: str = _B,
        precision: str = _PR, device: str = _D, download: bool = _DL, batch: int = _BATCH, engine: str = _ENGINE,
        workers: int | None = _WORKERS, embeddings: Path | None = _EMB, as_json: bool = _JSON,
        retry_failed: bool = _RETRY,
    ) -> None:  # fmt: skip
        """Build an index from embeddings (or from images, embedding them first)."""
        import time

        from ..errors import DatasetError
        from ..index import Index

        opts = _opts(model, pretrained, checkpoint, backend, precision, device, download)
        given = {"nlist": nlist, "nprobe": nprobe, "ef_search": ef_search}
        _refuse_unused(kind, given)
        check_output_folder(output, "--output")  # found by the save, after embedding every image
        if embeddings is not None:
            check_output_folder(embeddings, "--embeddings")
        emb_dir, label, _ = sources.embed_source(
            source, opts, embeddings or output.with_name(output.name + ".embeddings"), batch, engine, workers,
            retry_failed=retry_failed,
        )  # fmt: skip
        if emb_dir is None:
            raise DatasetError(f"{source}: no images to index")
        ids, vectors, model_name, meta = sources.read_vectors(emb_dir, label, opts.label if opts else None)
        if not ids:  # every image failed: no index, not an empty one (an index at `output` stays)
            failed = sources.report_failures(emb_dir, None, as_json, kept=True)
            if as_json and failed:
                typer.echo(
                    json.dumps({"source": str(source), "embeddings": str(emb_dir), **failed}, indent=2)
                )
            raise sources.nothing_readable(source, emb_dir, failed.get("failed", 0), "indexed", kept=True)
        if kind == "auto":
            given = _auto_options(len(ids), int(vectors.shape[1]), given)
        t0 = time.perf_counter()
        try:
            index = Index.build(ids, vectors, model=with_default_tag(model_name),
                                sizes=sources.image_sizes(emb_dir, ids),
                                image_roots=sources.image_roots(meta), kind=kind, nlist=given["nlist"],
                                nprobe=given["nprobe"], ef_search=given["ef_search"])  # fmt: skip
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        from ..report import fidelity_line, index_recall

        recall = index_recall(index, vectors, ids)  # an approximate kind states what it costs
        if recall is not None:
            index.extra["recall"] = recall
        if meta.get("fidelity"):
            # embedded by `clipengine embed` at a lower precision: its note, kept in the header
            index.extra["fidelity"] = meta["fidelity"]
            typer.echo(fidelity_line(meta["fidelity"]), err=True)
        if meta.get("precision"):  # an `index add` must embed at the same one (`_check_add_precision`)
            index.extra["precision"] = meta["precision"]
        if meta.get("model_files"):  # a model path: search / add refuse it once its files change
            index.extra["model_files"] = meta["model_files"]
        index.save(output)
        failed = sources.report_failures(emb_dir, index, as_json, kept=True)
        _echo_index(index, output, as_json, build_s=round(time.perf_counter() - t0, 3), **failed)

    @index_app.command("add")
    def add_cmd(
        index_path: Path = _INDEX_ARG,
        source: Path = _SOURCE_ARG,
        pretrained: str | None = _P, backend: str = _B, precision: str = _PR, device: str = _D,
        download: bool = _DL, batch: int = _BATCH, engine: str = _ENGINE, workers: int | None = _WORKERS,
        embeddings: Path | None = _ADD_EMB, as_json: bool = _JSON,
    ) -> None:  # fmt: skip
        """Append new images to an index without rebuilding it (ids already indexed are skipped)."""
        from ..errors import DatasetError
        from ..index import Index
        from ..index.store import remove_leftovers
        from ..pipeline.run_settings import model_files

        if embeddings is not None:
            check_output_folder(embeddings, "--embeddings")
        index = Index.load(index_path)
        opts = mo.parse_model_options(
            index.model, add_pretrained(index.model, pretrained), None, backend, precision, device, download
        )
        check_model_files(index, index_path, opts.label, model_files(opts.label))
        # Only the default INDEX.embeddings-add-<hash> is ours to delete after the save: a folder
        # named with --embeddings, or given as the source, is the user's.
        own_dir = embeddings is None and not sources.is_embed_dir(source)
        emb_dir, label, indexed = sources.embed_source(
            source, opts, embeddings or sources.add_dir(index_path), batch, engine, workers, index
        )
        if emb_dir is None and not indexed:  # as `index build`: a mistyped folder is no successful add
            raise DatasetError(f"{source}: no images to index")
        if emb_dir is None:  # every image of the folder is indexed already
            remove_leftovers(index_path)  # e.g. of an add killed after its save
            sources.remove_done_add_dirs(index_path, index)
            _echo_index(index, index_path, as_json, added=0, skipped=indexed)
            return
        ids, vectors, _, meta = sources.read_vectors(emb_dir, label, index.model)
        _check_add_precision(index, meta, emb_dir if own_dir else None)
        check_model_files(index, index_path, str(meta.get("model") or label), meta.get("model_files"))
        if not ids and not indexed:
            _refuse_unreadable(index, index_path, source, emb_dir, own_dir, as_json)
        added = index.add(ids, vectors, sizes=sources.image_sizes(emb_dir, ids), on_duplicate="skip")
        if added:  # the build's measured recall no longer describes it (IVF lists trained without them)
            index.extra.pop("recall", None)
        roots = [r for r in sources.image_roots(meta) if r not in index.image_roots]
        index.image_roots += roots
        if added or roots:  # else (e.g. a retry whose files still fail) a save would rewrite it all
            index.save(index_path)
        else:
            remove_leftovers(index_path)
        failed = sources.report_failures(emb_dir, index, as_json, kept=not own_dir)  # before its folder goes
        if own_dir:
            sources.remove_add_dir(emb_dir)
        sources.remove_done_add_dirs(index_path, index)  # those of adds killed after their save
        _echo_index(index, index_path, as_json, added=added, skipped=indexed + len(ids) - added, **failed)

    def _check_add_precision(index: Index, meta: dict[str, Any], own_dir: Path | None) -> None:
        """Refuse vectors embedded at another precision than the index's: an export folder is the
        same model label at fp32 and int8, and the two would mix in one index without a word."""
        built, now = index.extra.get("precision"), meta.get("precision")
        if built and now and built != now:
            if own_dir is not None:  # ours, and of no use: a rerun at the right precision starts afresh
                sources.remove_add_dir(own_dir)
            raise typer.BadParameter(
                f"the index was built from embeddings at precision {built}, these are at {now}: vectors of "
                f"two precisions would mix in one index; add with --precision {built}"
            )

    @index_app.command("info")
    def info_cmd(index_path: Path = _INDEX_ARG, as_json: bool = _JSON, verify: bool = _VERIFY) -> None:
        """Show an index's kind, size, model and parameters (from its header; --verify: check it all)."""
        from ..index import Index
        from ..index.persistence import describe_header, read_header

        if verify:  # as search, add and serve load it: every file hashed, the faiss structure read
            _echo_index(Index.load(index_path), index_path, as_json)
            return
        # The header alone: hashing and loading the whole index took ~7 s per 2 GB to print one line.
        _echo_described(*describe_header(read_header(index_path)), index_path, as_json)

    @app.command("search")
    def search_cmd(
        index_path: Path = _INDEX_ARG,
        query: str | None = _QUERY,
        image: Path | None = _IMAGE,
        k: int = _K,
        nprobe: int | None = _NPROBE,
        ef_search: int | None = _SEARCH_EF,
        model: str | None = _M, pretrained: str | None = _P, checkpoint: Path | None = _C, backend: str = _B,
        precision: str = _PR, device: str = _D, download: bool = _DL, as_json: bool = _JSON,
    ) -> None:  # fmt: skip
        """Print the k best matches (score, path) for a text or an image query."""
        from ..errors import IndexMismatchError
        from ..index import Index, same_model
        from ..pipeline.run_settings import model_files
        from ..zeroshot import check_utf8_texts

        if (query is None) == (image is None):
            raise typer.BadParameter("give a text query or --image (exactly one)")
        if query is not None and not query.strip():  # "" would embed as a text and rank every image
            raise typer.BadParameter("the text query is empty")
        if query is not None:  # bytes that are not UTF-8 would be searched as U+FFFD
            check_utf8_texts([query], "the query")
        index = Index.load(index_path)
        tuning = {"nprobe": nprobe, "ef_search": ef_search}
        for name, value in tuning.items():
            if value is not None and index.kind not in _KIND_OPTIONS[name]:  # the index's kind decides
                log.warning(
                    "--%s ignored: %s is a %s index (it applies to %s)", name.replace("_", "-"), index_path,
                    index.kind, " / ".join(_KIND_OPTIONS[name]),
                )  # fmt: skip
                tuning[name] = None
        override = model is not None or checkpoint is not None
        opts = _opts(model, pretrained, checkpoint, backend, precision, device, download) if override else None
        if opts is None:  # the model comes from the index header; --pretrained may name its tag
            opts = mo.parse_model_options(
                index.model, add_pretrained(index.model, pretrained), None, backend, precision, device, download
            )
        mismatch = IndexMismatchError(
            f"{index_path} was built with model {index.model!r}, not {opts.label!r}; "
            "drop --model / --checkpoint to use the index's own model"
        )
        # Refused before loading when the weights are known without them (offline, a missing
        # download would hide the mismatch); checkpoints and hub ids are judged once loaded.
        mismatched = mismatch_before_loading(opts, index.model) if override else False  # None: not known yet
        if mismatched:
            raise mismatch
        check_model_files(index, index_path, opts.label, model_files(opts.label))
        clip = mo.load_clip(opts)
        from ..report import fidelity, fidelity_line, recall_line

        for note in (fidelity_line(fidelity(clip.backend)), None if index.params.exact else
                     recall_line(index.kind, index.extra.get("recall"))):  # fmt: skip
            if note:
                typer.echo(note, err=True)
        if mismatched is None and not (same_model(opts.label, index.model) or same_model(clip.name, index.model)):
            raise mismatch
        q = clip.encode_images([image]) if image is not None else clip.encode_texts([query or ""])
        if q.shape[1] != index.dim:
            raise IndexMismatchError(
                f"{index_path} holds {index.dim}-d vectors; {clip.name} makes {q.shape[1]}-d"
            )
        _print_hits(index.search_vectors(q, k, **tuning)[0], index, as_json, str(image or query))
