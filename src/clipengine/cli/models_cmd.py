"""`clipengine models` (architectures, weight tags, cache state) and `clipengine download NAME[@TAG]`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = ["register"]


def _models() -> None:
    from ..models.config import architecture_names
    from ..models.registry import architectures, sources
    from ..models.weights import cache_path, is_cached
    from ..paths import weights_dir

    typer.echo(f"{'MODEL':<32} {'FORMAT':<10} {'CACHED':<7} FILE")
    for source in sources():
        cached = "yes" if is_cached(source) else "no"
        typer.echo(f"{source.key:<32} {source.format:<10} {cached:<7} {cache_path(source)}")
    bare = [name for name in architecture_names() if name not in architectures()]
    if bare:
        typer.echo(f"\nArchitectures without registered weights (use --checkpoint): {', '.join(bare)}")
    typer.echo(f"\nWeights cache: {weights_dir()} (set $CLIPENGINE_HOME to move it)")


def _download(name: str) -> None:
    from tqdm import tqdm

    from ..errors import UnknownModelError
    from ..models.registry import get_source
    from ..models.spec import parse_spec
    from ..models.weights import fetch, fetch_hub

    spec = parse_spec(name)
    if spec.kind not in ("registry", "hf-hub"):
        raise UnknownModelError(f"{name} is a local path, not a registered model: nothing to download")
    # Resolved before anything is drawn: an unknown name or tag is then the only output.
    source = get_source(spec.name, spec.tag) if spec.kind == "registry" else None
    # The bar is drawn on the first chunk, not before the connection: an unreachable host is then
    # one error line (no empty "0.00B" bar above it), and a file already cached draws nothing.
    bars: list[tqdm[Any]] = []

    def progress(done: int, total: int | None) -> None:
        if not bars:
            bars.append(tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=spec.display, total=total))
        bar = bars[0]
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        if source is None:
            path = fetch_hub(spec.name, allow_download=True, progress=progress)
        else:
            path = fetch(source, allow_download=True, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    typer.echo(f"{spec.display}: {path}")


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models() -> None:
        """List registered weights (NAME@TAG), whether each is cached, and bare architectures."""
        _models()

    @app.command("download")
    def download(
        name: Annotated[
            str, typer.Argument(metavar="NAME[@TAG]", help="e.g. ViT-B-32@openai or hf-hub:org/name")
        ],
    ) -> None:
        """Download weights into the cache (SHA-256 checked when the registry knows it)."""
        _download(name)
