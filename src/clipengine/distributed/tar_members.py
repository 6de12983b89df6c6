"""WebDataset tar members as items: listed on the driver, read lazily in the actors' decode process.

The driver lists each shard's members once (`tar_items`): a usable member becomes an item whose
source is a `MemberRef` (tar path, byte offset and size of its data) encoded as a string, so it
travels in the Ray job's rows as plain text. An actor hands those strings to its decode process
through `TarMemberPool`, which runs `load_member_chunk` in place of `batching.load_chunk`: the
members of one chunk are read there (seek + read, one open per tar), decoded and dropped, so the
actor itself never holds member bytes and the decode process holds one chunk's (the pipeline keeps
two chunks in flight; a partition of camera JPEGs is never in memory at once).

Nothing is dropped without a word: a member with an image name that cannot be embedded (a symlink,
a directory, a device file, a name with `..`, data cut short by a truncated tar) is listed too,
and becomes its Failure with the reason. A hard link to an earlier regular member of the same tar
is read as that member, as `tar -x` would extract it.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from ..errors import DatasetError, DecodeError
from ..image.decode import check_whole_read
from ..pipeline.batching import load_chunk
from ..pipeline.decode_pool import DecodePool, Solo
from ..pipeline.sources import is_image_name
from ..types import Failure, ImageItem

if TYPE_CHECKING:
    from ..pipeline.batching import _Chunk

__all__ = ["MemberRef", "TarMemberPool", "close_tars", "load_member_chunk", "read_member", "tar_items"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_SCHEME = "tar:"  # a source string holding a MemberRef as JSON
_KINDS = {  # tarfile member types that hold no bytes of their own
    tarfile.SYMTYPE: "a symlink",
    tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


@dataclass(frozen=True)
class MemberRef:
    """Where a tar member's bytes are, or why it cannot be embedded (`problem`: its Failure reason)."""

    tar: str  # resolved path of the shard
    member: str  # the member's name in the tar
    offset: int = 0  # where its data starts (in the uncompressed stream)
    size: int = 0
    tar_size: int = 0  # the shard's size when listed: offsets into a rewritten tar would read garbage
    problem: str | None = None

    def encode(self) -> str:
        return _SCHEME + json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, source: str | bytes) -> MemberRef | None:
        """The ref a source string holds, or None for any other source (a path, bytes)."""
        if not isinstance(source, str) or not source.startswith(_SCHEME + "{"):
            return None
        return cls(**json.loads(source[len(_SCHEME) :]))


# ---------------------------------------------------------------------------------------------- listing
def tar_items(tars: Sequence[Path]) -> list[ImageItem]:
    """Image members of WebDataset tar shards, ids ``<shard name>/<member>``, in shard then tar order.

    Raises:
        DatasetError: a shard cannot be opened as a tar at all.
    """
    items: list[ImageItem] = []
    for tar in sorted(tars):
        items.extend(ImageItem(_member_id(tar, ref.member), ref.encode()) for ref in _members(tar))
    return items


def _member_id(tar: Path, name: str) -> str:
    # A leading "/" is dropped, as tar and tarfile's extraction filters do: an id stays relative.
    return f"{tar.name}/{name.lstrip('/')}"


def _members(tar: Path) -> list[MemberRef]:
    resolved = str(tar.resolve())
    try:
        with open(tar, "rb") as raw, tarfile.open(fileobj=raw) as tf:
            size = raw.seek(0, 2)
            compressed = tf.fileobj is not raw  # gzip & co.: offsets are into the decompressed stream
            infos: list[tarfile.TarInfo] = []
            damaged = None
            try:
                while (info := tf.next()) is not None:
                    infos.append(info)
            except (tarfile.ReadError, EOFError) as e:  # cut short: the members before are still good
                damaged = str(e)
            if not compressed and damaged is None:
                damaged = _unlisted_tail(raw, tf.offset, size)
    except (OSError, tarfile.TarError) as e:
        raise DatasetError(f"{tar}: not a readable tar shard ({' '.join(str(e).split())})") from e
    if damaged:
        log.warning("%s: damaged or cut short after byte %d (%s); members past it cannot be listed",
                    tar, tf.offset, damaged)  # fmt: skip
    refs: list[MemberRef] = []
    regular: dict[str, tarfile.TarInfo] = {}  # hard links resolve to members met earlier
    for info in infos:
        target = regular.get(info.linkname) if info.islnk() else info
        if info.isfile():
            regular[info.name] = info
        if not is_image_name(PurePosixPath(info.name).name):
            continue  # captions, metadata: not images (WebDataset keeps them beside the image)
        ref = MemberRef(resolved, info.name, tar_size=size)
        problem = _problem(info, target, size if not compressed else None)
        if problem is not None or target is None:
            refs.append(_with(ref, problem=problem or "unreadable tar member"))
        else:
            refs.append(_with(ref, offset=target.offset_data, size=target.size))
    return refs


def _with(ref: MemberRef, **changes: Any) -> MemberRef:
    return MemberRef(**{**asdict(ref), **changes})


def _problem(info: tarfile.TarInfo, target: tarfile.TarInfo | None, tar_size: int | None) -> str | None:
    """Why `info` cannot be embedded, or None. `target`: the regular member holding its bytes."""
    if ".." in PurePosixPath(info.name).parts:  # an id must not point outside its shard
        return "tar member name contains '..': not used (it would extract outside the folder)"
    if info.islnk():
        if target is None:
            return f"tar member is a hard link to {info.linkname!r}, which is not a regular member before it"
        info = target
    if info.type in _KINDS:
        extra = f" to {info.linkname!r}: not followed" if info.issym() else ": not a regular file"
        return f"tar member is {_KINDS[info.type]}{extra}"
    if info.issparse():
        return "tar member is a sparse file: not supported"
    if not info.isfile():
        return f"tar member has type {info.type!r}: not a regular file"
    if tar_size is not None and info.offset_data + info.size > tar_size:
        have = max(0, tar_size - info.offset_data)
        return f"tar member is cut short: the tar ends after {have} of its {info.size} bytes"
    return None


def _unlisted_tail(raw: IO[bytes], offset: int, size: int) -> str | None:
    """Why the bytes after the last listed member are not a tar's end (zero blocks), or None.
    tarfile stops listing without an error at a header that is cut short or garbled."""
    if offset >= size:
        return "no end-of-archive marker"
    raw.seek(offset)
    tail = raw.read(min(size - offset, 1 << 16))
    return None if not tail.strip(b"\0") else "a header that cannot be read"


# ---------------------------------------------------------------------------------------------- reading
_OPEN_TARS = 4  # open shards kept per decode process (a partition spans one or two)
_open: OrderedDict[str, tuple[tarfile.TarFile, IO[bytes]]] = OrderedDict()


def _tar_stream(ref: MemberRef) -> IO[bytes]:
    """The shard's (decompressed) byte stream, opened once per decode process and kept for the
    next chunks: a gzip stream read in order is then decompressed once, not once per chunk."""
    if ref.tar in _open:
        _open.move_to_end(ref.tar)
        return _open[ref.tar][1]
    try:
        tf = tarfile.open(ref.tar)
    except (OSError, tarfile.TarError) as e:
        raise DatasetError(
            f"{ref.tar}: cannot read the tar shard listed when the job started ({' '.join(str(e).split())}); "
            "moved, deleted or unmounted since?"
        ) from e
    size = Path(ref.tar).stat().st_size
    if ref.tar_size and size != ref.tar_size:
        tf.close()
        raise DatasetError(
            f"{ref.tar}: changed since it was listed ({ref.tar_size} -> {size} bytes); run again"
        )
    stream = cast(IO[bytes], tf.fileobj)
    _open[ref.tar] = (tf, stream)
    while len(_open) > _OPEN_TARS:
        _open.popitem(last=False)[1][0].close()
    return stream


def close_tars() -> None:
    """Close the shards this process keeps open (tests running the decode in-process call it)."""
    while _open:
        _open.popitem()[1][0].close()


_HEAD_BYTES = 1 << 16  # what `check_whole_read` may look at: the formats' signatures and headers


def read_member(ref: MemberRef) -> bytes:
    """The member's bytes (fewer than `ref.size` when the tar ends early).

    Raises:
        DecodeError: a member no image could be, by its first bytes, or one over `MAX_FILE_BYTES`:
            refused before the rest is read, as a loose file is (a 4 GB video named .jpg in a shard).
    """
    stream = _tar_stream(ref)
    stream.seek(ref.offset)
    head = stream.read(min(ref.size, _HEAD_BYTES))
    check_whole_read(ref.member, ref.size, io.BytesIO(head))
    if len(head) < _HEAD_BYTES:  # the whole member (or all the tar still holds)
        return head
    return head + stream.read(ref.size - len(head))


def load_member_chunk(
    items: Sequence[tuple[str, str | bytes]],
    cfg: dict[str, Any],
    fast_decode: bool = False,
    normalise: bool = True,
) -> _Chunk:
    """`batching.load_chunk`, where a source may also be a `MemberRef` string: read here, in the
    decode process, one chunk at a time; an unusable member becomes its Failure."""
    ready: list[tuple[str, str | bytes]] = []
    failures: list[Failure] = []
    t0 = time.perf_counter()
    for item_id, source in items:
        ref = MemberRef.decode(source)
        if ref is None:
            ready.append((item_id, source))
            continue
        if ref.problem is not None:
            failures.append(Failure(item_id, ref.problem))
            continue
        try:
            data = read_member(ref)
        except (OSError, EOFError) as e:  # this member's failure, as an unreadable file is (EOFError: gzip)
            failures.append(Failure(item_id, f"cannot read tar member: {e}"))
            continue
        except DecodeError as e:  # refused by its first bytes or its size, as a loose file is
            failures.append(Failure(item_id, e.reason))
            continue
        if len(data) < ref.size:  # the tar was cut short after it was listed
            failures.append(Failure(item_id, f"tar member is cut short: {len(data)} of its {ref.size} bytes"))
        else:
            ready.append((item_id, data))
    read_s = time.perf_counter() - t0
    chunk = load_chunk(ready, cfg, fast_decode, normalise)
    chunk.failures.extend(failures)  # the shard puts rows and failures back in input order
    chunk.read_s += read_s
    return chunk


def _with_members(fn: Callable[..., Any]) -> Callable[..., Any]:
    return load_member_chunk if fn is load_chunk else fn


class TarMemberPool(DecodePool):
    """A `DecodePool` whose `load_chunk` tasks run `load_member_chunk`: the pipeline hands its
    decode process member refs (a few hundred bytes each) and that process reads the members."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(cast(Callable[P, T], _with_members(fn)), *args, **kwargs)

    def solo(self) -> Solo:
        return _MemberSolo(lambda: self._new_pool(1))


class _MemberSolo(Solo):
    """`Solo` (the retry of a chunk after a decode process died), reading tar members too."""

    def run(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        return super().run(_with_members(fn), *args)
