"""The local disk tier: one self-describing file per chunk, an in-memory LRU index rebuilt at start.

Layout: ``<root>/<fingerprint.hex()[:16]>/<key.hex()[:2]>/<key.hex()>.kvo``. The namespace directory
keeps models (and TP ranks) apart, so a shared ``local_disk`` never mixes them and ``kvoffload cache
ls`` can tell them apart without opening a file. The two-hex-digit fan-out keeps directories small.

Each file is :data:`HEADER_SIZE` bytes of header (see :func:`pack_header`) followed by the payload. The
header repeats the full key and fingerprint, so a file copied or renamed into the wrong place, written by
another model, or hit by a 64-bit prefix collision of the directory name is detected, not served.

Why the choices:

* Writes go to a temporary name in the final directory and are published with ``os.replace``, so a
  reader sees either no file or a whole one, and a crash leaves only a temporary file that the next
  start removes.
* No ``fsync``: this is a cache. After a power loss a renamed file may hold fewer bytes than its header
  says; the length and checksum checks turn that into a miss (the request recomputes). Paying a device
  flush per chunk on the store path would buy nothing else.
* The index (sizes and mtimes) is rebuilt by listing the namespace directory at start, so files survive
  a restart and count against the byte limit (LMCache's disk index is memory-only; its files are
  neither reused nor cleaned up). Files are not opened at start: they are verified when read. Only
  files that can be chunks count (in their own subdirectory, no larger than the limit); junk named like
  a chunk is removed, since its size would otherwise evict the real chunks at every start.
* A chunk file is opened without blocking and must be a regular file: a FIFO or a symbolic link under a
  chunk's name is a bad entry (a miss, removed), never a read that hangs.
* A read refreshes the file's mtime, so the LRU order survives a restart too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

import xxhash

from kvoffload.config import ConfigError
from kvoffload.errors import BadEntry
from kvoffload.tiers.base import ChunkTier, PutResult, TierStats

logger = logging.getLogger(__name__)

MAGIC = b"KVOC"
#: Version of the entry layout (this header), independent of the KV format inside the fingerprint.
HEADER_VERSION = 1
# magic, header version, reserved, key, fingerprint, payload length, xxh3-128 of the payload
_HEADER_BODY = struct.Struct("<4sHH32s32sQ16s")
_HEADER_CHECK = struct.Struct("<Q")  # xxh3-64 of the header body: tells a damaged header from a foreign one
HEADER_SIZE = _HEADER_BODY.size + _HEADER_CHECK.size

SUFFIX = ".kvo"
_TMP_MARK = ".tmp."
#: A temporary file older than this at start belongs to a writer that died (a chunk takes well under a second).
_STALE_TMP_SECONDS = 60.0


@dataclass(frozen=True)
class Header:
    key: bytes
    fingerprint: bytes
    length: int
    checksum: bytes


def pack_header(key: bytes, fingerprint: bytes, payload: memoryview) -> bytes:
    """The header of an entry holding ``payload``; shared by the disk and Redis tiers."""
    body = _HEADER_BODY.pack(MAGIC, HEADER_VERSION, 0, key, fingerprint, payload.nbytes,
                             xxhash.xxh3_128_digest(payload))
    return body + _HEADER_CHECK.pack(xxhash.xxh3_64_intdigest(body))


def unpack_header(data: bytes | memoryview) -> Header:
    """Parse and check a header on its own (magic, version, its own checksum); raise :class:`BadEntry`."""
    if len(data) < HEADER_SIZE:
        raise BadEntry(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    body = data[:_HEADER_BODY.size]
    magic, version, _reserved, key, fingerprint, length, checksum = _HEADER_BODY.unpack(body)
    if magic != MAGIC:
        raise BadEntry("not a kvoffload entry (bad magic)")
    if version != HEADER_VERSION:
        raise BadEntry(f"entry format version {version}, this kvoffload reads {HEADER_VERSION}")
    (check,) = _HEADER_CHECK.unpack(data[_HEADER_BODY.size:HEADER_SIZE])
    if check != xxhash.xxh3_64_intdigest(body):
        raise BadEntry("header checksum mismatch")
    return Header(key, fingerprint, length, checksum)


def check_header(header: Header, key: bytes, fingerprint: bytes, length: int) -> None:
    """Raise :class:`BadEntry` unless ``header`` describes exactly the entry the caller asked for."""
    if header.key != key:
        raise BadEntry("header names another chunk key")
    if header.fingerprint != fingerprint:
        raise BadEntry("header names another storage fingerprint (model, layout or TP rank)")
    if header.length != length:
        raise BadEntry(f"payload length {header.length}, expected {length}")


def byte_view(buf: memoryview) -> memoryview:
    """``buf`` as flat bytes, whatever the exporter's format (a numpy or torch view of a slot)."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class OnceLog:
    """Logs the first failure of each kind only: a full disk would otherwise log once per chunk.

    Later failures of the same kind are only counted in the tier's stats, which the metrics expose.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._logger = log
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        self._logger.warning(msg + " (further failures of this kind are only counted in the tier's stats)", *args)


class DiskTier(ChunkTier):
    """Chunks as files under ``root``, LRU-evicted by bytes (headers included) above ``max_bytes``."""

    name = "disk"
    _drops = "removed it"  # what a bad file's warning says was done with it

    def __init__(self, root: str, fingerprint: bytes, max_bytes: int) -> None:
        if len(fingerprint) != 32:
            raise ValueError(f"fingerprint must be 32 bytes, got {len(fingerprint)}")
        if max_bytes <= 0:
            raise ConfigError(f"max_local_disk_size must be > 0 for the disk tier at {root}, got {max_bytes} bytes")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.stats = TierStats()
        self.namespace_dir = self.root / fingerprint.hex()[:16]
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes, least recently used first
        self._pending: set[bytes] = set()  # keys whose file is being written or unlinked
        self._used = 0  # bytes of indexed files plus those of writes in flight
        self._in_flight = 0  # bytes reserved by writes in flight (not evictable)
        self._removed: list[bytes] = []
        self._log = OnceLog(logger)
        self._open()

    def _open(self) -> None:
        _prepare_dir(self.namespace_dir, str(self.root))
        self._load_index()

    # ---------------------------------------------------------------- start-up

    def _load_index(self) -> None:
        """Index the files a previous run left, counting only what can be one of this tier's chunks.

        A file counts if it is a regular file named like a chunk, in the subdirectory its name puts it in,
        and no larger than the whole limit (``put`` never writes one that is). Anything else named like a
        chunk (copied into the wrong place, or a sparse file of terabytes) would never be served, yet its
        size would evict every real chunk at each start: it is removed. An mtime in the future (a clock set
        back, a copied file) counts as now, so such a file does not outrank every chunk read since.
        """
        found: list[tuple[float, bytes, int]] = []
        junk = 0
        now = time.time()
        for sub in _scandir_dirs(self.namespace_dir):
            for entry in _scandir_files(sub.path):
                key = _key_from_name(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if key is None:
                    if _TMP_MARK in entry.name and now - st.st_mtime > _STALE_TMP_SECONDS:
                        _unlink_quietly(entry.path)
                elif _placed(sub.name, key) and HEADER_SIZE < st.st_size <= self.max_bytes:
                    found.append((min(st.st_mtime, now), key, st.st_size))
                else:
                    junk += 1
                    _unlink_quietly(entry.path)
        if junk:
            logger.warning("kvoffload disk tier at %s: removed %d files named like chunks that cannot be this tier's "
                           "(in another chunk's subdirectory, empty, or larger than max_local_disk_size)",
                           self.namespace_dir, junk)
        found.sort()
        for _mtime, key, size in found:
            self._index[key] = size
            self._used += size
        with self._lock:
            victims = self._evict_locked(0)
        self._unlink(victims)
        logger.info("kvoffload disk tier at %s: %d chunks, %.3f of %.3f GB", self.namespace_dir,
                    len(self._index), self._used / 1e9, self.max_bytes / 1e9)

    # ---------------------------------------------------------------- ChunkTier

    def put(self, key: bytes, payload: memoryview) -> PutResult:
        payload = byte_view(payload)
        size = HEADER_SIZE + payload.nbytes
        with self._lock:
            if key in self._index:  # keys name their content: the stored bytes are already these
                self._index.move_to_end(key)
                return PutResult.STORED
            # Skipped: too big for the limit, already being written, or the room is reserved by writes in flight.
            if key in self._pending or self._in_flight + size > self.max_bytes:
                self.stats.skipped_writes += 1
                return PutResult.SKIPPED
            victims = self._evict_locked(size)
            self._used += size
            self._in_flight += size
            self._pending.add(key)
        self._unlink(victims)

        path = self._path(key)
        tmp = f"{path}{_TMP_MARK}{os.getpid()}.{threading.get_ident()}"
        start = time.perf_counter()
        try:
            header = pack_header(key, self.fingerprint, payload)
            os.makedirs(path.parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            with self._lock:
                self._pending.discard(key)
                self._used -= size
                self._in_flight -= size
                self.stats.errors += 1
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            self._log.warning(f"write:{name}", "kvoffload disk tier: cannot write chunks under %s: %s (%s); "
                              "chunks are not stored on disk until this is fixed", self.namespace_dir,
                              exc.strerror or exc, name)
            return PutResult.FAILED
        elapsed = time.perf_counter() - start
        with self._lock:
            self._pending.discard(key)
            self._in_flight -= size
            self._index[key] = size
            self.stats.writes += 1
            self.stats.bytes_written += payload.nbytes
            self.stats.write_seconds += elapsed
        return PutResult.STORED

    def get_into(self, key: bytes, out: memoryview) -> bool:
        out = byte_view(out)
        with self._lock:
            if not self._may_hold(key):
                self.stats.misses += 1
                return False
        path = self._path(key)
        start = time.perf_counter()
        try:
            with _open_entry(path) as f:
                header = unpack_header(f.read(HEADER_SIZE))
                check_header(header, key, self.fingerprint, out.nbytes)
                if os.fstat(f.fileno()).st_size != HEADER_SIZE + out.nbytes:
                    raise BadEntry("file size does not match the header (truncated or extended)")
                _read_exactly(f, out)
            if xxhash.xxh3_128_digest(out) != header.checksum:
                raise BadEntry("payload checksum mismatch")
        except FileNotFoundError:  # removed behind our back (cache clear): a plain miss
            self._forget(key, delete=False)
            with self._lock:
                self.stats.misses += 1
            return False
        except BadEntry as exc:
            self._forget(key, delete=True)
            with self._lock:
                self.stats.corrupt += 1
                self.stats.misses += 1
            self._log.warning(f"corrupt:{exc}", "kvoffload disk tier: %s: %s; %s, the request recomputes "
                              "this chunk", path, exc, self._drops)
            return False
        except OSError as exc:
            self._forget(key, delete=True)
            with self._lock:
                self.stats.errors += 1
                self.stats.misses += 1
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            self._log.warning(f"read:{name}", "kvoffload disk tier: cannot read %s: %s (%s); %s, the "
                              "request recomputes this chunk", path, exc.strerror or exc, name, self._drops)
            return False
        elapsed = time.perf_counter() - start
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            self.stats.hits += 1
            self.stats.bytes_read += out.nbytes
            self.stats.read_seconds += elapsed
        try:
            os.utime(path)  # keeps the LRU order across restarts
        except OSError:
            pass
        return True

    def contains(self, keys: Iterable[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def drain_removed(self) -> list[bytes]:
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    # ---------------------------------------------------------------- internals

    def _may_hold(self, key: bytes) -> bool:
        """Whether the chunk's file may exist (called under the lock)."""
        return key in self._index

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.namespace_dir / name[:2] / f"{name}{SUFFIX}"

    def _evict_locked(self, incoming: int) -> list[bytes]:
        """Drop least recently used entries until ``incoming`` more bytes fit; returns keys to :meth:`_unlink`."""
        victims: list[bytes] = []
        while self._index and self._used + incoming > self.max_bytes:
            key, size = self._index.popitem(last=False)
            self._used -= size
            self._removed.append(key)
            self._pending.add(key)
            self.stats.evictions += 1
            victims.append(key)
        return victims

    def _unlink(self, keys: list[bytes]) -> None:
        """Delete the files of keys already taken out of the index and marked pending.

        Outside the lock, since unlinking a large file takes a while; a reader holding the file open
        keeps reading it. The keys stay pending until their file is gone, so a concurrent ``put`` of the
        same key cannot publish a file that this unlink would then remove.
        """
        for key in keys:
            _unlink_quietly(self._path(key))
        with self._lock:
            self._pending.difference_update(keys)

    def _forget(self, key: bytes, delete: bool) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is None:
                return
            self._used -= size
            self._removed.append(key)
            if delete:
                self._pending.add(key)
        if delete:
            self._unlink([key])


class DiskReader(DiskTier):
    """Reads the chunks that another worker's :class:`DiskTier` writes in the same namespace, and changes nothing
    there: the tensor-parallel ranks of an MLA model keep one copy, written by rank 0 (see
    ``kvoffload.vllm.identity.storage_share``).

    The writer adds files after this reader started, so the reader keeps no index: each read opens the chunk's
    file, and a missing one is a miss. A bad file is a miss too, and stays for the writer to remove: every rank
    loads every chunk, so rank 0 reads the same file in the same prefetch."""

    _drops = "left it for rank 0 to remove"

    def _open(self) -> None:
        logger.info("kvoffload disk tier at %s: reading the chunks rank 0 writes", self.namespace_dir)

    def put(self, key: bytes, payload: memoryview) -> PutResult:
        raise RuntimeError("kvoffload: a DiskReader does not write; rank 0's DiskTier stores the chunks")

    def _may_hold(self, key: bytes) -> bool:
        return True

    def contains(self, keys: Iterable[bytes]) -> list[bool]:
        return [self._path(key).is_file() for key in keys]

    def _forget(self, key: bytes, delete: bool) -> None:
        return  # no index, and the writer's files are the writer's


# -------------------------------------------------------------------- filesystem helpers


def _prepare_dir(path: Path, root: str) -> None:
    """Create ``path`` and prove it is writable, so a bad ``local_disk`` fails at start, not per chunk."""
    root_path = Path(root)
    if root_path.exists() and not root_path.is_dir():
        raise ConfigError(f"local_disk {root!r} is not a directory; point it at a directory (or remove the file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the disk tier directory {path} (local_disk {root!r}): "
                          f"{exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{path} (under local_disk {root!r}) is not a directory")
    probe = path / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
        os.unlink(probe)
    except OSError as exc:
        _unlink_quietly(probe)
        raise ConfigError(f"the disk tier directory {path} (local_disk {root!r}) is not writable: "
                          f"{exc.strerror or exc}") from None


def _open_entry(path: Path) -> BinaryIO:
    """Open a chunk file for reading; raise :class:`BadEntry` for anything but a regular file.

    A FIFO (or a device) under a chunk's name would block ``open`` until a writer appears, holding a
    prefetch thread and the request behind it: ``O_NONBLOCK`` makes the open return at once, and the
    ``fstat`` then tells what it is. ``O_NOFOLLOW``: a symbolic link is not a file this tier wrote, and
    following it could lead anywhere (a FIFO again, a file another process owns).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadEntry("a symbolic link, not a chunk file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadEntry("not a regular file (a FIFO, device or socket)")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _read_exactly(f, out: memoryview) -> None:
    done = 0
    while done < out.nbytes:
        n = f.readinto(out[done:])
        if not n:
            raise BadEntry("file shorter than its header says (truncated)")
        done += n


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _scandir_dirs(path: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _scandir_files(path: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _key_from_name(name: str) -> bytes | None:
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else ""
    return bytes.fromhex(stem) if _is_hex(stem, 64) else None


def _placed(subdir: str, key: bytes) -> bool:
    """Whether a chunk file of ``key`` found in ``subdir`` is where this tier puts it (see :meth:`DiskTier._path`)."""
    return subdir == key.hex()[:2]


def _namespace_dirs(root: str | Path) -> list[os.DirEntry]:
    return [d for d in _scandir_dirs(root) if _is_hex(d.name, 16)]


# -------------------------------------------------------------------- scheduler and CLI helpers


def list_disk_keys(root: str, fingerprint: bytes) -> set[bytes]:
    """Keys stored for ``fingerprint`` under ``root``, from file names alone (no open, no stat).

    For the scheduler process, which needs to know what exists but never reads payloads.
    """
    keys: set[bytes] = set()
    for sub in _scandir_dirs(Path(root) / fingerprint.hex()[:16]):
        for entry in _scandir_files(sub.path):  # the directory entry's type: no stat on common filesystems
            key = _key_from_name(entry.name)
            if key is not None and _placed(sub.name, key):  # a misplaced file is never served
                keys.add(key)
    return keys


@dataclass(frozen=True)
class DiskEntry:
    namespace: str  # the 16-hex-digit fingerprint prefix
    key: bytes
    bytes: int
    mtime: float


def _entry_files(root: str | Path) -> Iterable[tuple[str, os.DirEntry]]:
    for ns in _namespace_dirs(root):
        for sub in _scandir_dirs(ns.path):
            for entry in _scandir_files(sub.path):
                yield ns.name, entry


def scan(root: str) -> list[DiskEntry]:
    """Every chunk file under ``root``, of every namespace (model/rank)."""
    entries: list[DiskEntry] = []
    for namespace, entry in _entry_files(root):
        key = _key_from_name(entry.name)
        if key is None:
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        entries.append(DiskEntry(namespace, key, st.st_size, st.st_mtime))
    return entries


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    removed: int = 0


def _verify_file(path: str, namespace: str, key: bytes) -> None:
    hasher = xxhash.xxh3_128()
    with _open_entry(Path(path)) as f:
        header = unpack_header(f.read(HEADER_SIZE))
        if header.key != key:
            raise BadEntry("header names another chunk key than the file name")
        if header.fingerprint.hex()[:16] != namespace:
            raise BadEntry("header names another storage fingerprint than the directory")
        if os.fstat(f.fileno()).st_size != HEADER_SIZE + header.length:
            raise BadEntry("file size does not match the header (truncated or extended)")
        while block := f.read(1 << 22):
            hasher.update(block)
    if hasher.digest() != header.checksum:
        raise BadEntry("payload checksum mismatch")


def verify(root: str, fix: bool) -> VerifyReport:
    """Check every chunk file's header and checksum; with ``fix``, remove the bad ones.

    Without the fingerprint of a running engine this checks self-consistency only: the header's key
    matches the file name, its fingerprint matches the directory, the length and the checksum hold.
    """
    report = VerifyReport()
    for namespace, entry in _entry_files(root):
        key = _key_from_name(entry.name)
        if key is None:
            continue
        report.checked += 1
        try:
            _verify_file(entry.path, namespace, key)
        except FileNotFoundError:
            report.checked -= 1  # removed while we looked (an engine evicted it)
            continue
        except (BadEntry, OSError) as exc:
            report.bad.append((entry.path, str(exc)))
            if fix:
                try:
                    os.unlink(entry.path)
                    report.removed += 1
                except FileNotFoundError:
                    report.removed += 1
                except OSError:
                    pass
    return report


def clear(root: str) -> int:
    """Remove every kvoffload chunk and temporary file under ``root``; returns the number of files removed.

    Only files named like ours inside namespace directories are touched, so a ``local_disk`` that points
    at a directory holding other data loses nothing else.
    """
    removed = 0
    for ns in _namespace_dirs(root):
        for sub in _scandir_dirs(ns.path):
            for entry in _scandir_files(sub.path):
                if _key_from_name(entry.name) is not None or _TMP_MARK in entry.name:
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
            try:
                os.rmdir(sub.path)
            except OSError:
                pass
        try:
            os.rmdir(ns.path)
        except OSError:
            pass
    return removed
