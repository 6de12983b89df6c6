"""Folder -> embeddings: sources, parallel decode batching, backend calls, shard sinks, and the runner."""

from __future__ import annotations

from .run import RunStats, embed_folder, pending_images, run_partition
from .sinks import ShardSink, read_embeddings, read_failures
from .sources import list_items, partitions

__all__ = [
    "RunStats",
    "ShardSink",
    "embed_folder",
    "list_items",
    "partitions",
    "pending_images",
    "read_embeddings",
    "read_failures",
    "run_partition",
]
