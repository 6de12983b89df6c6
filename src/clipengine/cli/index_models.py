"""Which weights an index's model names, for `index build`, `index add` and `search`: the default
tag an index records, a `--pretrained` tag checked against the index's own, and `search --model`
refused before loading when it names other weights.

Separate from `index_cmd` (the commands and their options) because it is the one part that reads
model specs and the weights registry: a wrong answer here means results from the wrong model, with
no error, so it is kept where it can be read as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from ..index import Index
    from ..models.spec import ModelSpec
    from .model_options import ModelOptions

__all__ = ["add_pretrained", "check_model_files", "mismatch_before_loading", "with_default_tag"]


def with_default_tag(model: str) -> str:
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


def add_pretrained(index_model: str, pretrained: str | None) -> str | None:
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


def mismatch_before_loading(opts: ModelOptions, index_model: str) -> bool | None:
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


def check_model_files(index: Index, index_path: Path, label: str, now: dict[str, str] | None) -> None:
    """Refuse `label`, the index's own model path, when its files are not the ones the index was
    built with (`now`: their digests, `pipeline.run_settings.model_files`, from the model folder or
    from an embed folder's run.json). The path alone does not tell: weights saved over it (a
    fine-tune, a re-export) keep the name, and the new model's queries ranked the old embeddings
    with no error. Nothing to judge without both records, or for another label (judged by name).

    Raises:
        IndexMismatchError: a file the index's model had differs, or is gone.
    """
    from ..errors import IndexMismatchError

    built = index.extra.get("model_files")
    if label != index.model or not isinstance(built, dict) or not built or not now:
        return
    changed = sorted(f for f in built.keys() & now.keys() if built[f] != now[f])
    changed = changed or sorted(built.keys() - now.keys())
    if changed:
        raise IndexMismatchError(
            f"{index_path} was built with the model at {label}, whose files have changed since "
            f"({changed[0]} differs): its embeddings would not match the indexed ones; rebuild the "
            "index, or restore the model it was built with"
        )
