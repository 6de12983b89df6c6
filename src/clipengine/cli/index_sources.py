"""Where `index build` / `index add` get their vectors: an embed folder as is, or images embedded
first (into INDEX.embeddings, or a folder of its own per `index add`), then read back with their
sizes, image roots and failures.

Separate from `index_cmd` (the commands and their options) because this is the one part that
touches the pipeline's folders and shard formats.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from . import model_options as mo
from .predict import shown_name

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..errors import DatasetError
    from ..index import Index
    from ..types import ImageItem

__all__ = [
    "add_dir",
    "embed_source",
    "image_roots",
    "image_sizes",
    "is_embed_dir",
    "nothing_readable",
    "read_vectors",
    "remove_add_dir",
    "remove_done_add_dirs",
    "report_failures",
]


def is_embed_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "run.json").is_file() or (path / "shards").is_dir())


def _shard_rows(embed_dir: Path) -> Iterator[dict[str, Any]]:
    """The rows of the run's shard .jsonl files (pipeline shard format): {"path", "index", "width",
    "height"}. Only the run's own shards (`shard_stems`): a rerun over fewer files leaves older ones
    behind, whose rows (an older size of a file, ids no longer listed) are not this run's."""
    from ..pipeline.sinks import shard_stems

    for stem in shard_stems(embed_dir):
        rows = embed_dir / "shards" / f"{stem}.jsonl"
        if not rows.is_file():
            continue
        for line in rows.read_text(encoding="utf-8").split("\n"):  # not splitlines(): ids may hold U+2028
            if line:
                yield json.loads(line)


def image_sizes(embed_dir: Path, ids: list[str]) -> list[tuple[int, int] | None]:
    """(width, height) per id from the shard .jsonl rows."""
    found: dict[str, tuple[int, int]] = {}
    for r in _shard_rows(embed_dir):
        if r.get("width") is not None and r.get("height") is not None:
            found[r["path"]] = (int(r["width"]), int(r["height"]))
    return [found.get(i) for i in ids]


def image_roots(meta: dict[str, Any]) -> list[str]:
    src = meta.get("source")
    if not src:
        return []
    p = Path(src)
    return [str(p)] if p.is_dir() else [str(p.parent)]  # a file list's ids are relative to its folder


def embed_source(
    source: Path,
    opts: mo.ModelOptions | None,
    embed_dir: Path | Callable[[Sequence[ImageItem]], Path],
    batch: int,
    engine: str,
    workers: int | None,
    known: Index | None = None,
    retry_failed: bool = False,
) -> tuple[Path | None, str, int]:
    """The embed folder for `source` (embedding it first when it is images), its model label, and
    how many of its images were left out because `known` (an index) holds their ids already.
    `embed_dir` may be a function of the images to embed (see `add_dir`).

    Returns (None, label, n) when nothing is left to embed.
    """
    if is_embed_dir(source):
        return source, "", 0
    if opts is None:
        raise typer.BadParameter("embedding images needs --model (or --checkpoint)")
    from ..pipeline.sources import list_items

    listed = list_items(source)
    label = str(source.resolve())
    if known is not None and source.is_dir():
        listed, label = _ids_in_index(source, listed, known)
    items = [i for i in listed if known is None or i.id not in known]
    if not items:
        return None, opts.label, len(listed)
    if callable(embed_dir):
        embed_dir = embed_dir(items)
    kwargs: dict[str, Any] = {"model": opts.label, "batch_size": batch, "source_label": label}
    if retry_failed:  # a kept embed folder's shards that list failures are recomputed
        kwargs["retry_failed"] = True
    if engine == "ray":  # each actor loads the model; the driver holds none
        from ..distributed.ray import embed_with_ray

        embed_with_ray(items, embed_dir, mo.BackendFactory(opts), mo.preprocess_only(opts), **kwargs)
    else:
        from ..pipeline.run import embed_folder, pending_images, reusable_run_info
        from ..report import fidelity_line

        finished = None if pending_images(items, embed_dir, retry_failed=retry_failed) else reusable_run_info(embed_dir)
        clip: ClipModel | None = None
        if finished is None:
            clip = mo.load_clip(opts)
            backend, preprocess = (lambda: clip.backend), clip.preprocess_cfg
        else:  # every shard complete (an index built again, e.g. of another --kind): no model to load
            backend, preprocess = (lambda: mo.load_clip(opts).backend), finished["preprocess"]
        note = fidelity_line(mo.run_fidelity(clip, opts))  # a lower precision states its deviation, as embed
        if note:
            typer.echo(note, err=True)
        embed_folder(items, embed_dir, backend, preprocess, workers=workers, **kwargs)
    return embed_dir, opts.label, len(listed) - len(items)


def _ids_in_index(folder: Path, listed: list[ImageItem], index: Index) -> tuple[list[ImageItem], str]:
    """The folder's images named as `index` names them, and the image root their ids are relative to.

    An index's ids are paths relative to its image roots. An image under a root (adding ROOT/new, or
    a folder holding ROOT) is named relative to that root: relative to the folder given, ROOT/new/a.jpg
    would take the id of ROOT/a.jpg and be skipped as indexed already, and ROOT/a.jpg (given its
    parent) would be added twice. The other images keep their paths relative to the folder, which
    becomes a new root; where such a path is an id of the index already, it names another image,
    and skipping it would lose it without a word: refused.

    Raises:
        DatasetError: an image outside the index's roots whose path is an indexed id.
    """
    from ..errors import DatasetError
    from ..types import ImageItem

    base = folder.resolve()
    roots = [Path(r) for r in index.image_roots]
    named: list[ImageItem] = []
    outside: list[str] = []
    used: Path | None = None  # a root the images are named under: no new root to record then
    for item in listed:
        path = base / item.id
        root = next((r for r in roots if path.is_relative_to(r)), None)
        if root is None:
            outside.append(item.id)
            named.append(item)
        else:
            named.append(ImageItem(path.relative_to(root).as_posix(), item.source))
            used = used or root
    taken = [i for i in outside if i in index]
    if taken:
        raise DatasetError(
            f"{folder}: {len(taken)} of its images have paths that are ids of other images in the index "
            f"(e.g. {taken[0]!r}, indexed from {', '.join(index.image_roots) or 'an embed folder'}); ids are "
            "paths relative to the folder given, so they would be skipped as indexed already. Build the "
            "index from a folder that holds both folders instead"
        )
    return named, str(used) if used is not None and not outside else str(base)


_ADD_SUFFIX = ".embeddings-add-"


def add_dir(index_path: Path) -> Callable[[Sequence[ImageItem]], Path]:
    """Where `index add` embeds new images by default: a folder of their own, named by their ids.

    Not INDEX.embeddings: embedding another list of images there would overwrite the build's
    shards. Named by the ids, so a rerun after a crash resumes the same folder; deleted once the
    add is saved (`remove_add_dir`).
    """

    def folder(items: Sequence[ImageItem]) -> Path:
        ids = "\n".join(item.id for item in items).encode("utf-8", "surrogatepass")
        return index_path.with_name(f"{index_path.name}{_ADD_SUFFIX}{hashlib.sha256(ids).hexdigest()[:12]}")

    return folder


def report_failures(embed_dir: Path, index: Index | None, as_json: bool, kept: bool) -> dict[str, Any]:
    """Tell the user which images of `embed_dir` could not be read and are not in `index` (an
    embed folder given to `index add` can name failures the index got since from elsewhere; None:
    no index was made, every failure counts).

    Returns the fields for the command's summary: `failed` (a count) and, with --json, every
    failure; on stderr, the first few with their reasons. `kept`: whether `embed_dir` (and its
    failures.jsonl) stays after the command, so the message can point at the full list.
    """
    from ..pipeline.sinks import FAILURES_FILE, read_failures

    failures = [f for f in read_failures(embed_dir) if index is None or f.id not in index]
    if not failures:
        return {}
    shown = 10
    where = f"listed in {embed_dir / FAILURES_FILE}" if kept else "rerun `clipengine index add` to retry them"
    lines = [f"{len(failures)} image(s) could not be read and are not in the index ({where}):"]
    lines += [f"  {shown_name(f.id)}: {f.reason}" for f in failures[:shown]]  # a newline in a name: one line
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more")
    typer.echo("\n".join(lines), err=True)
    fields: dict[str, Any] = {"failed": len(failures)}
    if as_json:
        fields["failures"] = [{"id": f.id, "reason": f.reason} for f in failures]
    return fields


def nothing_readable(source: Path, embed_dir: Path, failed: int, done: str, kept: bool) -> DatasetError:
    """The error for a source of which no image could be embedded, after `report_failures` (its
    `failed` count): as `clipengine embed` says it, since a script would go on with an index that
    lacks them all. A source with no failure either holds no image (`index build` of an empty folder).
    """
    from ..errors import DatasetError
    from ..pipeline.sinks import FAILURES_FILE

    if not failed:
        return DatasetError(f"{source}: no images to index")
    where = (
        f"the reasons are in {embed_dir / FAILURES_FILE}"
        if kept
        else "the reasons are listed above; rerun `clipengine index add` to retry them"
    )
    return DatasetError(f"{source}: none of the {failed} images could be read, nothing was {done}; {where}")


def remove_add_dir(folder: Path) -> None:
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


def remove_done_add_dirs(index_path: Path, index: Index) -> None:
    """Delete the `index add` folders that earlier adds left when killed after their save, before
    `remove_add_dir`: finished runs whose every embedded id is in `index` now. A rerun does not
    reuse them (it embeds only the ids the index lacks, into a folder named by those), so they
    would stay for good. A run not finished, or with ids the index lacks, is kept: a rerun of its
    add resumes it, or another add is still filling it.
    """
    from ..errors import ClipEngineError
    from ..pipeline.sinks import read_run_info

    prefix = index_path.name + _ADD_SUFFIX
    for folder in index_path.parent.iterdir():
        tag = folder.name[len(prefix) :] if folder.name.startswith(prefix) else ""
        if len(tag) != 12 or not all(c in "0123456789abcdef" for c in tag) or not folder.is_dir():
            continue
        try:
            done = (read_run_info(folder) or {}).get("status") == "complete"
            done = done and all(r["path"] in index for r in _shard_rows(folder))
        except (ClipEngineError, OSError, ValueError, KeyError):  # unreadable: not ours to judge
            continue
        if done:
            remove_add_dir(folder)


def read_vectors(
    embed_dir: Path, label: str, expect: str | None
) -> tuple[list[str], Any, str, dict[str, Any]]:
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
