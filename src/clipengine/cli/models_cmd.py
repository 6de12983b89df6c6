"""`clipengine models` (architectures, weight tags, cache state) and `clipengine download NAME[@TAG]`."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["register"]


def _models() -> None:
    from ..models.config import architecture_names
    from ..models.registry import architectures, sources
    from ..models.weights import cache_path, cache_status
    from ..paths import weights_dir

    typer.echo(f"{'MODEL':<32} {'FORMAT':<10} {'CACHED':<9} FILE")
    states = {source.key: cache_status(source) for source in sources()}
    for source in sources():
        typer.echo(f"{source.key:<32} {source.format:<10} {states[source.key]:<9} {cache_path(source)}")
    if "unchecked" in states.values():  # a file placed by hand (or damaged) was listed as "yes"
        typer.echo("\nunchecked: present, its SHA-256 not checked yet; the next load (or clipengine download "
                   "NAME@TAG) checks it")  # fmt: skip
    bare = [name for name in architecture_names() if name not in architectures()]
    if bare:
        typer.echo(f"\nArchitectures without registered weights (use --checkpoint): {', '.join(bare)}")
    typer.echo(f"\nWeights cache: {weights_dir()} (set $CLIPENGINE_HOME to move it)")


def _download(name: str) -> None:
    from ..errors import UnknownModelError
    from ..models.spec import parse_spec
    from .downloads import fetch_with_progress

    path = fetch_with_progress(name)
    if path is None:
        raise UnknownModelError(f"{name} is a local path, not a registered model: nothing to download")
    typer.echo(f"{parse_spec(name).display}: {path}")


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
