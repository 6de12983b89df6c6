"""Weights downloads with a progress bar, for `clipengine download` and every `--download` option.

The library downloads without drawing anything (`models.weights.fetch` takes a progress callback);
the bar is the CLI's. `--download` on predict / embed / eval used to go through `load` alone, so a
338 MB download ran for minutes with no sign of life.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_before_download", "fetch_with_progress"]


def fetch_with_progress(name: str, pretrained: str | None = None) -> Path | None:
    """Fetch the weights of a registry name or `hf-hub:` repo into the cache, with a tqdm bar while
    bytes arrive; a cached file draws nothing. Returns the local path, or None for a local path
    (nothing to download).

    Raises:
        UnknownModelError: an unknown name or tag (before anything is drawn).
        DownloadError, CheckpointError: as `models.weights.fetch`.
    """
    from tqdm import tqdm

    from ..models.registry import get_source
    from ..models.spec import parse_spec
    from ..models.weights import fetch, fetch_hub

    spec = parse_spec(name, pretrained)
    if spec.kind not in ("registry", "hf-hub"):
        return None
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
            return fetch_hub(spec.name, allow_download=True, progress=progress)
        return fetch(source, allow_download=True, progress=progress)
    finally:
        for bar in bars:
            bar.close()


def check_before_download(name: str, pretrained: str | None, device: str, precision: str) -> None:
    """Refuse, before `fetch_with_progress` downloads `name`, a device or precision the torch load
    after it would refuse (no CUDA, fp16 on CPU): that error came only once the whole checkpoint had
    been downloaded and read. Only for what would be downloaded (a registry name or hub id): a local
    path, an export folder included, is judged by its load.

    Raises:
        BackendError: as `TorchBackend` would (InputError for an unknown device or precision), or
            torch is not installed (the extra to add, as `api.load` says it).
        UnknownModelError: as `fetch_with_progress` would, for an unknown name or tag.
    """
    from ..errors import BackendError
    from ..extras import install_hint
    from ..models.spec import parse_spec

    if parse_spec(name, pretrained).kind not in ("registry", "hf-hub"):
        return
    try:
        from ..backends.torch_backend import check_device_precision
    except ModuleNotFoundError as e:  # no torch: what the load would say, without the download
        hint = install_hint(e)
        if hint is None:
            raise
        raise BackendError(f"loading {name}: {hint}") from e
    check_device_precision(device, precision)
