"""`clipengine index build|add|info` and `clipengine search`: embeddings -> faiss index -> text/image queries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from . import embed as embed_cli
from . import model_options as mo

if TYPE_CHECKING:
    from ..index import Index
    from ..models.spec import ModelSpec
    from ..types import ImageItem

__all__ = ["register"]

_KINDS_HELP = "auto (exact up to 100k vectors, IVF above), flat, ivf, ivfpq or hnsw."
_SOURCE_HELP = "An `clipengine embed` output folder, or images (folder / file list) to embed first."


def _is_embed_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "run.json").is_file() or (path / "shards").is_dir())


def _sizes(embed_dir: Path, ids: list[str]) -> list[tuple[int, int] | None]:
    """(width, height) per id from the shard .jsonl rows (pipeline shard format)."""
    found: dict[str, tuple[int, int]] = {}
    for rows in sorted((embed_dir / "shards").glob("part-*.jsonl")):
        if rows.name.endswith(".failures.jsonl"):
            continue
        for line in rows.read_text(encoding="utf-8").split("\n"):  # not splitlines(): ids may hold U+2028
            if not line:
                continue
            r = json.loads(line)
            if r.get("width") is not None and r.get("height") is not None:
                found[r["path"]] = (int(r["width"]), int(r["height"]))
    return [found.get(i) for i in ids]


def _image_roots(meta: dict[str, Any]) -> list[str]:
    src = meta.get("source")
    if not src:
        return []
    p = Path(src)
    return [str(p)] if p.is_dir() else [str(p.parent)]  # a file list's ids are relative to its folder


def _embeddings(
    source: Path,
    opts: mo.ModelOptions | None,
    embed_dir: Path | Callable[[Sequence[ImageItem]], Path],
    batch: int,
    engine: str,
    workers: int | None,
    known: Index | None = None,
) -> tuple[Path | None, str, int]:
    """The embed folder for `source` (embedding it first when it is images), its model label, and
    how many of its images were left out because `known` (an index) holds their ids already.
    `embed_dir` may be a function of the images to embed (see `_add_dir`).

    Returns (None, label, n) when nothing is left to embed.
    """
    if _is_embed_dir(source):
        return source, "", 0
    if opts is None:
        raise typer.BadParameter("embedding images needs --model (or --checkpoint)")
    from ..pipeline.sources import list_items

    listed = list_items(source)
    items = [i for i in listed if known is None or i.id not in known]
    if not items:
        return None, opts.label, len(listed)
    if callable(embed_dir):
        embed_dir = embed_dir(items)
    clip = mo.load_clip(opts)
    kwargs: dict[str, Any] = {"model": opts.label, "batch_size": batch, "source_label": str(source.resolve())}
    if engine == "ray":
        from ..distributed.ray import embed_with_ray

        embed_with_ray(items, embed_dir, mo.BackendFactory(opts), clip.preprocess_cfg, **kwargs)
    else:
        from ..pipeline.run import embed_folder

        embed_folder(items, embed_dir, lambda: clip.backend, clip.preprocess_cfg, workers=workers, **kwargs)
    return embed_dir, opts.label, len(listed) - len(items)


def _add_dir(index_path: Path) -> Callable[[Sequence[ImageItem]], Path]:
    """Where `index add` embeds new images by default: a folder of their own, named by their ids.

    Not INDEX.embeddings: embedding another list of images there would overwrite the build's
    shards. Named by the ids, so a rerun after a crash resumes the same folder; deleted once the
    add is saved (`_remove_add_dir`).
    """

    def folder(items: Sequence[ImageItem]) -> Path:
        ids = "\n".join(item.id for item in items).encode("utf-8", "surrogatepass")
        return index_path.with_name(f"{index_path.name}.embeddings-add-{hashlib.sha256(ids).hexdigest()[:12]}")

    return folder


def _report_failures(embed_dir: Path, index: Index, as_json: bool, kept: bool) -> dict[str, Any]:
    """Tell the user which images of `embed_dir` could not be read and are not in `index` (an
    embed folder given to `index add` can name failures the index got since from elsewhere).

    Returns the fields for the command's summary: `failed` (a count) and, with --json, every
    failure; on stderr, the first few with their reasons. `kept`: whether `embed_dir` (and its
    failures.jsonl) stays after the command, so the message can point at the full list.
    """
    from ..pipeline.sinks import FAILURES_FILE, read_failures

    failures = [f for f in read_failures(embed_dir) if f.id not in index]
    if not failures:
        return {}
    shown = 10
    where = f"listed in {embed_dir / FAILURES_FILE}" if kept else "rerun `clipengine index add` to retry them"
    lines = [f"{len(failures)} image(s) could not be read and are not in the index ({where}):"]
    lines += [f"  {f.id}: {f.reason}" for f in failures[:shown]]
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more")
    typer.echo("\n".join(lines), err=True)
    fields: dict[str, Any] = {"failed": len(failures)}
    if as_json:
        fields["failures"] = [{"id": f.id, "reason": f.reason} for f in failures]
    return fields


def _remove_add_dir(folder: Path) -> None:
    """Delete an `index add` folder once the index it went into is saved.

    It only served a rerun after a crash (resume); the saved index holds its vectors now, and a
    rerun skips those ids, so it would embed into another folder anyway. Left in place it would
    grow the disk by one folder per add. A failure to delete costs nothing but the space.
    """
    import shutil

    try:
        shutil.rmtree(folder)
    except OSError as e:
        typer.echo(f"warning: could not remove {folder} (no longer needed): {e}", err=True)


def _read(embed_dir: Path, label: str, expect: str | None) -> tuple[list[str], Any, str, dict[str, Any]]:
    from ..errors import IndexMismatchError
    from ..index import same_model
    from ..pipeline.sinks import read_embeddings

    ids, vectors, meta = read_embeddings(embed_dir)
    model = str(meta.get("model") or label or "")
    if not model:
        raise typer.BadParameter(f"{embed_dir}/run.json names no model; pass --model")
    if expect and not same_model(expect, model):
        raise IndexMismatchError(f"{embed_dir} was embedded with {model!r}, not {expect!r}")
    return ids, vectors, model, meta


def _with_default_tag(model: str) -> str:
    """`model` as an index records it: a registry name without a tag gets the default tag that
    loading used ("ViT-B-32" -> "ViT-B-32@openai"), so that a later search with other weights of
    the architecture is refused instead of answered with wrong results (same dimension, no error).
    Paths, hub ids, tagged names and names without registered weights are kept as they are."""
    from ..errors import ClipEngineError
    from ..models.registry import default_tag
    from ..models.spec import parse_spec

    if "@" in model:
        return model
    try:
        spec = parse_spec(model)
        return f"{model}@{default_tag(spec.name)}" if spec.kind == "registry" and spec.tag is None else model
    except ClipEngineError:  # a path that is gone, a name with no weights: as recorded
        return model


def _add_pretrained(index_model: str, pretrained: str | None) -> str | None:
    """`index add` / `search` `--pretrained` without `--model`: the tag to load the index's model with. A model the index records
    with its tag ("ViT-B-32@openai", as `index build` writes it) keeps that tag: the same one again
    is dropped (it would make "ViT-B-32@openai@openai", and the add folder would record that), and
    another one is refused before anything is embedded."""
    if pretrained is None or "@" not in index_model or Path(index_model).expanduser().exists():
        return pretrained
    tag = index_model.rpartition("@")[2]
    if pretrained != tag:
        raise typer.BadParameter(
            f"the index was built with {index_model!r}; --pretrained {pretrained!r} names other weights"
        )
    return None


def _weights(spec: ModelSpec, fill_default: bool) -> str:
    """A registry spec as the weights it loads: "ARCH@TAG" ("ViT-B/32@openai" -> "ViT-B-32@openai"),
    with the default tag filled in when `fill_default` (as loading does), and "-quickgelu" kept only
    where it forces an activation the weights were not trained with ("ViT-B-32-quickgelu@openai"
    is "ViT-B-32@openai"; "ViT-B-32-quickgelu@laion2b_s34b_b79k" is not "ViT-B-32@laion2b_s34b_b79k":
    same shapes, other outputs)."""
    from ..errors import UnknownModelError
    from ..models.registry import default_tag, get_source

    tag = spec.tag
    if tag is None and fill_default:
        try:
            tag = default_tag(spec.name)
        except UnknownModelError:  # no registered weights: loading fails; the name is all there is
            pass
    forced = ""
    if spec.quick_gelu:
        try:
            forced = "" if tag is not None and get_source(spec.name, tag).quick_gelu else "-quickgelu"
        except UnknownModelError:  # weights not registered: the name as given
            forced = "-quickgelu"
    return f"{spec.name}{forced}@{tag}" if tag else spec.name + forced


def _mismatch_before_loading(opts: mo.ModelOptions, index_model: str) -> bool | None:
    """Whether `opts` names other weights than the index's, when that is known without loading:
    a registry name (no tag meaning the default one) or an export folder (its manifest). None for
    checkpoint files, model folders and hub ids: only loading them tells.

    Not judged by the loaded model's name: it carries no tag, so any weights of the architecture
    (same dimension: no error, wrong results) would pass.
    """
    from ..errors import ClipEngineError
    from ..export.manifest import MANIFEST_FILE, read_manifest
    from ..index import same_model
    from ..models.spec import parse_spec

    if opts.label == index_model:
        return False
    path = Path(opts.source).expanduser()
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        m = read_manifest(path)
        mine = m.model if m.pretrained is None else f"{m.model}@{m.pretrained}"
    else:
        try:
            spec = parse_spec(opts.source, opts.pretrained)
        except ClipEngineError:  # loading says what is wrong with it
            return None
        if spec.kind != "registry":
            return None
        mine = _weights(spec, fill_default=True)
    try:
        index_spec = parse_spec(index_model)
        theirs = _weights(index_spec, fill_default=False) if index_spec.kind == "registry" else index_model
    except ClipEngineError:  # e.g. a checkpoint path that is gone
        theirs = index_model
    # A tagless index model (what ClipModel.name gives the API) matches any tag of its architecture.
    return not (same_model(mine, theirs) or same_model(mine, index_model))


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
    info = {"path": str(path), **index.describe(), **extra}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    how = "exact" if info["exact"] else "approximate"
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items() if k != "kind")
    typer.echo(f"{path}: {info['count']} images, {info['kind']} ({how}{'; ' + params if params else ''}), "
               f"dim {info['dim']}, model {info['model']}" + "".join(f", {k} {v}" for k, v in extra.items()))  # fmt: skip


def _print_hits(hits: list[tuple[str, float]], index: Index, as_json: bool, query: str) -> None:
    rows = [
        {"rank": r + 1, "id": i, "path": str(index.resolve(i) or i), "score": round(s, 6)}
        for r, (i, s) in enumerate(hits)
    ]
    if as_json:
        typer.echo(json.dumps({"query": query, "model": index.model, "results": rows}, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['score']:7.4f}  {row['path']}")  # width 7: -1.0000, so paths line up


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
    None, "--embeddings", help="Where to keep embeddings of images (default: INDEX.embeddings; for "
    "`index add`, a folder of its own beside it, INDEX.embeddings-add-<hash of the new ids>, "
    "deleted once the add is saved)."
)
_JSON = typer.Option(False, "--json", help="Print JSON.")
_SOURCE_ARG = typer.Argument(..., exists=True, help=_SOURCE_HELP)
_OUTPUT = typer.Option(..., "--output", "-o", help="Index folder to write (e.g. photos.index).")
_KIND = typer.Option("auto", "--kind", help=_KINDS_HELP)
_NLIST = typer.Option(None, "--nlist", min=1, help="IVF lists (default 4*sqrt(N)).")
_NPROBE = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query.")
_EF = typer.Option(None, "--ef-search", min=1, help="HNSW search breadth.")
_INDEX_ARG = typer.Argument(..., help="Index folder (e.g. photos.index).")
_QUERY = typer.Argument(None, help='Text query, e.g. "a dog on the beach".')
_IMAGE = typer.Option(None, "--image", exists=True, help="Search by this image instead.")
_K = typer.Option(10, "-k", "--top-k", min=1, help="Number of results.")


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
    ) -> None:  # fmt: skip
        """Build an index from embeddings (or from images, embedding them first)."""
        import time

        from ..errors import DatasetError
        from ..index import Index

        opts = _opts(model, pretrained, checkpoint, backend, precision, device, download)
        emb_dir, label, _ = _embeddings(
            source, opts, embeddings or output.with_name(output.name + ".embeddings"), batch, engine, workers
        )
        if emb_dir is None:
            raise DatasetError(f"{source}: no images to index")
        ids, vectors, model_name, meta = _read(emb_dir, label, opts.label if opts else None)
        t0 = time.perf_counter()
        try:
            index = Index.build(ids, vectors, model=_with_default_tag(model_name), sizes=_sizes(emb_dir, ids),
                                image_roots=_image_roots(meta),
                                kind=kind, nlist=nlist, nprobe=nprobe, ef_search=ef_search)  # fmt: skip
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        index.save(output)
        failed = _report_failures(emb_dir, index, as_json, kept=True)
        _echo_index(index, output, as_json, build_s=round(time.perf_counter() - t0, 3), **failed)

    @index_app.command("add")
    def add_cmd(
        index_path: Path = _INDEX_ARG,
        source: Path = _SOURCE_ARG,
        pretrained: str | None = _P, backend: str = _B, precision: str = _PR, device: str = _D,
        download: bool = _DL, batch: int = _BATCH, engine: str = _ENGINE, workers: int | None = _WORKERS,
        embeddings: Path | None = _EMB, as_json: bool = _JSON,
    ) -> None:  # fmt: skip
        """Append new images to an index without rebuilding it (ids already indexed are skipped)."""
        from ..index import Index

        index = Index.load(index_path)
        opts = mo.parse_model_options(
            index.model, _add_pretrained(index.model, pretrained), None, backend, precision, device, download
        )
        # Only the default INDEX.embeddings-add-<hash> is ours to delete after the save: a folder
        # named with --embeddings, or given as the source, is the user's.
        own_dir = embeddings is None and not _is_embed_dir(source)
        emb_dir, label, indexed = _embeddings(source, opts, embeddings or _add_dir(index_path), batch, engine, workers,
                                              index)  # fmt: skip
        if emb_dir is None:  # every image of the folder is indexed already
            _echo_index(index, index_path, as_json, added=0, skipped=indexed)
            return
        ids, vectors, _, meta = _read(emb_dir, label, index.model)
        added = index.add(ids, vectors, sizes=_sizes(emb_dir, ids), on_duplicate="skip")
        index.image_roots += [r for r in _image_roots(meta) if r not in index.image_roots]
        index.save(index_path)
        failed = _report_failures(emb_dir, index, as_json, kept=not own_dir)  # before its folder goes
        if own_dir:
            _remove_add_dir(emb_dir)
        _echo_index(index, index_path, as_json, added=added, skipped=indexed + len(ids) - added, **failed)

    @index_app.command("info")
    def info_cmd(index_path: Path = _INDEX_ARG, as_json: bool = _JSON) -> None:
        """Show an index's kind, size, model and parameters."""
        from ..index import Index

        _echo_index(Index.load(index_path), index_path, as_json)

    @app.command("search")
    def search_cmd(
        index_path: Path = _INDEX_ARG,
        query: str | None = _QUERY,
        image: Path | None = _IMAGE,
        k: int = _K,
        nprobe: int | None = _NPROBE,
        model: str | None = _M, pretrained: str | None = _P, checkpoint: Path | None = _C, backend: str = _B,
        precision: str = _PR, device: str = _D, download: bool = _DL, as_json: bool = _JSON,
    ) -> None:  # fmt: skip
        """Print the k best matches (score, path) for a text or an image query."""
        from ..errors import IndexMismatchError
        from ..index import Index, same_model

        if (query is None) == (image is None):
            raise typer.BadParameter("give a text query or --image (exactly one)")
        if query is not None and not query.strip():  # "" would embed as a text and rank every image
            raise typer.BadParameter("the text query is empty")
        index = Index.load(index_path)
        override = model is not None or checkpoint is not None
        opts = _opts(model, pretrained, checkpoint, backend, precision, device, download) if override else None
        if opts is None:  # the model comes from the index header; --pretrained may name its tag
            opts = mo.parse_model_options(
                index.model, _add_pretrained(index.model, pretrained), None, backend, precision, device, download
            )
        mismatch = IndexMismatchError(
            f"{index_path} was built with model {index.model!r}, not {opts.label!r}; "
            "drop --model / --checkpoint to use the index's own model"
        )
        # Refused before loading when the weights are known without them (offline, a missing
        # download would hide the mismatch); checkpoints and hub ids are judged once loaded.
        mismatched = _mismatch_before_loading(opts, index.model) if override else False  # None: not known yet
        if mismatched:
            raise mismatch
        clip = mo.load_clip(opts)
        if mismatched is None and not (same_model(opts.label, index.model) or same_model(clip.name, index.model)):
            raise mismatch
        q = clip.encode_images([image]) if image is not None else clip.encode_texts([query or ""])
        if q.shape[1] != index.dim:
            raise IndexMismatchError(
                f"{index_path} holds {index.dim}-d vectors; {clip.name} makes {q.shape[1]}-d"
            )
        _print_hits(index.search_vectors(q, k, nprobe=nprobe)[0], index, as_json, str(image or query))
