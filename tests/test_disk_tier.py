"""The disk tier (round trip, restart, bad files, start-up checks, run-time failures, LRU) and the
AsyncWriter that feeds it."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvoffload.config import ConfigError
from kvoffload.keys import with_state_key
from kvoffload.tiers import disk
from kvoffload.tiers.base import PutResult
from kvoffload.tiers.disk import HEADER_SIZE, DiskReader, DiskTier, list_disk_keys
from kvoffload.tiers.writer import AsyncWriter

FP = bytes(range(32))
OTHER_FP = bytes(range(1, 33))
CHUNK = 4096


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def payload(i: int, size: int = CHUNK) -> memoryview:
    return memoryview(bytes((i + j) % 251 for j in range(size)))


def path_of(root: Path, k: bytes, fp: bytes = FP) -> Path:
    return root / fp.hex()[:16] / k.hex()[:2] / f"{k.hex()}.kvo"


def read(tier: DiskTier, k: bytes, size: int = CHUNK) -> bytes | None:
    out = bytearray(size)
    return bytes(out) if tier.get_into(k, memoryview(out)) else None


def test_round_trip_and_layout(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    assert tier.put(key(1), payload(1)) is PutResult.STORED
    assert read(tier, key(1)) == bytes(payload(1))
    assert path_of(tmp_path, key(1)).stat().st_size == HEADER_SIZE + CHUNK
    assert tier.contains([key(1), key(2)]) == [True, False]
    assert read(tier, key(2)) is None
    assert (tier.stats.hits, tier.stats.misses, tier.stats.bytes_written) == (1, 1, CHUNK)
    assert list_disk_keys(str(tmp_path), FP) == {key(1)}
    assert list_disk_keys(str(tmp_path), OTHER_FP) == set()


def test_restart_finds_old_chunks_and_cleans_stale_temp_files(tmp_path: Path) -> None:
    first = DiskTier(str(tmp_path), FP, 10**6)
    first.put(key(1), payload(1))
    first.put(key(2), payload(2))
    first.close()
    sub = path_of(tmp_path, key(1)).parent
    stale, fresh = sub / f"{key(1).hex()}.kvo.tmp.1.1", sub / f"{key(3).hex()}.kvo.tmp.1.2"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    second = DiskTier(str(tmp_path), FP, 10**6)
    assert second.contains([key(1), key(2), key(3)]) == [True, True, False]
    assert read(second, key(2)) == bytes(payload(2))
    assert not stale.exists()
    assert fresh.exists()  # may belong to a live writer in another process


def test_truncated_file_is_a_miss_and_removed(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(1), payload(1))
    p = path_of(tmp_path, key(1))
    os.truncate(p, HEADER_SIZE + CHUNK - 10)
    assert read(tier, key(1)) is None
    assert not p.exists()
    assert tier.stats.corrupt == 1
    assert tier.contains([key(1)]) == [False]
    assert tier.drain_removed() == [key(1)]


def test_flipped_payload_byte_is_a_miss_and_removed(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(1), payload(1))
    p = path_of(tmp_path, key(1))
    data = bytearray(p.read_bytes())
    data[HEADER_SIZE + 100] ^= 0x01
    p.write_bytes(data)
    assert read(tier, key(1)) is None
    assert not p.exists() and tier.stats.corrupt == 1


def test_file_of_another_fingerprint_is_a_miss_and_removed(tmp_path: Path) -> None:
    other = DiskTier(str(tmp_path / "other"), OTHER_FP, 10**6)
    other.put(key(1), payload(1))
    p = path_of(tmp_path, key(1))
    p.parent.mkdir(parents=True)
    path_of(tmp_path / "other", key(1), OTHER_FP).rename(p)  # a foreign file in our namespace directory

    tier = DiskTier(str(tmp_path), FP, 10**6)
    assert tier.contains([key(1)]) == [True]  # listing trusts names; the read checks the header
    assert read(tier, key(1)) is None
    assert not p.exists() and tier.stats.corrupt == 1


def test_header_for_another_key_is_a_miss_and_removed(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(2), payload(2))
    p = path_of(tmp_path, key(1))
    os.makedirs(p.parent, exist_ok=True)
    path_of(tmp_path, key(2)).rename(p)
    tier = DiskTier(str(tmp_path), FP, 10**6)
    assert read(tier, key(1)) is None
    assert not p.exists() and tier.stats.corrupt == 1


def test_chunk_without_its_state_under_its_state_key_is_a_miss(tmp_path: Path) -> None:
    """A model with state: a chunk saved without its state, copied to the name of the same chunk with its state,
    must not be read as one (its stale state page would start a hit from the wrong recurrent state)."""
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(3), payload(3))
    p = path_of(tmp_path, with_state_key(key(3)))
    os.makedirs(p.parent, exist_ok=True)
    shutil.copy(path_of(tmp_path, key(3)), p)
    tier = DiskTier(str(tmp_path), FP, 10**6)
    assert read(tier, with_state_key(key(3))) is None
    assert not p.exists() and tier.stats.corrupt == 1
    assert read(tier, key(3)) == bytes(payload(3))  # the chunk itself still serves, without its state


def in_thread(call, timeout: float = 5.0, unblock=None):
    """``call()`` on a thread; fails instead of hanging the suite if it is still blocked after ``timeout``.

    ``unblock`` releases a call that blocked (so the thread does not outlive the test)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"blocked for more than {timeout} s")
    return result[0]


def open_fifo_for_writing(path: Path) -> None:
    """Let a reader blocked in open() on the FIFO ``path`` go on (it then reads end of file)."""
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_fifo_under_a_chunk_name_is_a_miss_without_blocking(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(1), payload(1))
    p = path_of(tmp_path, key(1))
    p.unlink()
    os.mkfifo(p)  # open() for reading waits for a writer: the read must not
    start = time.monotonic()
    assert in_thread(lambda: read(tier, key(1)), unblock=lambda: open_fifo_for_writing(p)) is None
    assert time.monotonic() - start < 5
    assert (tier.stats.corrupt, tier.stats.misses, tier.stats.hits) == (1, 1, 0)
    assert not p.exists()
    assert tier.contains([key(1)]) == [False]
    assert tier.drain_removed() == [key(1)]


def test_symlink_under_a_chunk_name_is_a_miss_and_removed(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path / "root"), FP, 10**6)
    tier.put(key(1), payload(1))
    p = path_of(tmp_path / "root", key(1))
    target = tmp_path / "elsewhere.kvo"
    p.rename(target)
    p.symlink_to(target)  # a valid chunk's bytes, but not a file this tier wrote where it wrote it
    assert read(tier, key(1)) is None
    assert tier.stats.corrupt == 1
    assert not p.is_symlink() and target.exists()  # the link is removed, not what it points to


def test_restart_ignores_and_removes_junk_named_like_chunks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry = HEADER_SIZE + CHUNK
    first = DiskTier(str(tmp_path), FP, 10 * entry)
    for i in range(3):
        first.put(key(i), payload(i))
    first.close()
    year_2100 = 4102444800.0
    misplaced = tmp_path / FP.hex()[:16] / "ff" / f"{key(9).hex()}.kvo"  # key(9)'s place is 00/
    oversized = path_of(tmp_path, key(8))  # in its place, but larger than the whole limit
    for junk in (misplaced, oversized):
        junk.parent.mkdir(parents=True, exist_ok=True)
        with open(junk, "wb") as f:
            f.truncate(100 * 10**9)  # sparse: 100 GB that take no space
        os.utime(junk, (year_2100, year_2100))
    assert list_disk_keys(str(tmp_path), FP) == {key(0), key(1), key(2), key(8)}  # names only: not the misplaced

    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.disk"):
        second = DiskTier(str(tmp_path), FP, 10 * entry)
    assert second.contains([key(0), key(1), key(2)]) == [True, True, True]
    assert read(second, key(1)) == bytes(payload(1))
    assert second.contains([key(8), key(9)]) == [False, False]
    assert second.stats.evictions == 0
    assert not misplaced.exists() and not oversized.exists()
    assert list_disk_keys(str(tmp_path), FP) == {key(0), key(1), key(2)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "removed 2 files named like chunks" in warnings[0], warnings
    # the real chunks fill the limit as before: seven more fit without evicting them
    for i in range(10, 17):
        second.put(key(i), payload(i))
    assert second.stats.evictions == 0


def test_reader_serves_what_the_writer_stores_later_and_changes_nothing(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The tensor-parallel ranks of an MLA model share rank 0's files: a reader started before the writer wrote
    anything (even before the directory exists) finds each chunk at its read; a bad file is a miss for the reader
    and stays for the writer, whose own read removes it."""
    reader = DiskReader(str(tmp_path), FP, 10**6)
    assert read(reader, key(1)) is None and not (tmp_path / FP.hex()[:16]).exists()
    writer = DiskTier(str(tmp_path), FP, 10**6)
    assert writer.put(key(1), payload(1)) is PutResult.STORED
    assert writer.put(key(2), payload(2)) is PutResult.STORED
    assert reader.contains([key(1), key(3)]) == [True, False]
    assert read(reader, key(1)) == bytes(payload(1))
    with pytest.raises(RuntimeError, match="does not write"):
        reader.put(key(3), payload(3))
    bad = path_of(tmp_path, key(2))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kvoffload"):
        assert read(reader, key(2)) is None
    assert bad.exists() and "left it for rank 0 to remove" in caplog.text
    assert (reader.stats.hits, reader.stats.corrupt, reader.drain_removed()) == (1, 1, [])
    assert read(writer, key(2)) is None and not bad.exists()
    assert writer.drain_removed() == [key(2)]


def test_wrong_expected_length_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    tier.put(key(1), payload(1))
    assert read(tier, key(1), CHUNK // 2) is None
    assert tier.stats.corrupt == 1


def test_root_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DiskTier(str(f), FP, 10**6)
    with pytest.raises(ConfigError, match="cannot create"):
        DiskTier(str(f / "below"), FP, 10**6)


def _mount_read_only_tmpfs(target: Path) -> bool:
    target.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def test_read_only_root_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount when the sandbox allows mounting; otherwise EROFS is simulated on ``open``.

    As root, chmod does not block writes, so a chmod'ed directory would prove nothing.
    """
    target = tmp_path / "ro"
    if _mount_read_only_tmpfs(target):
        try:
            with pytest.raises(ConfigError, match="cannot create|not writable"):
                DiskTier(str(target), FP, 10**6)
        finally:
            subprocess.run(["umount", str(target)], check=True)
        return
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    with pytest.raises(ConfigError, match="not writable.*Read-only file system"):
        DiskTier(str(target), FP, 10**6)


def test_disk_full_at_run_time_fails_soft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A 16 KiB tmpfs fills up for real when the sandbox allows mounting; otherwise ENOSPC is simulated."""
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    try:
        tier = DiskTier(str(target), FP, 10**6)
        if not mounted:
            def full(src, dst):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(disk.os, "replace", full)
        with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.disk"):
            results = [tier.put(key(i), payload(i)) for i in range(8)]
        assert PutResult.FAILED in results and set(results) <= {PutResult.STORED, PutResult.FAILED}
        assert tier.stats.errors == results.count(PutResult.FAILED) >= 2
        assert tier.contains([key(i) for i in range(8)]) == [r is PutResult.STORED for r in results]
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "ENOSPC" in messages[0] and not caplog.records[0].exc_info
        assert not [p for p in target.rglob("*") if ".tmp." in p.name]
        stored = [i for i, r in enumerate(results) if r is PutResult.STORED]
        assert all(read(tier, key(i)) == bytes(payload(i)) for i in stored)
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)


def test_lru_eviction_by_bytes(tmp_path: Path) -> None:
    entry = HEADER_SIZE + CHUNK
    tier = DiskTier(str(tmp_path), FP, 3 * entry)
    for i in range(3):
        tier.put(key(i), payload(i))
    assert read(tier, key(0)) is not None  # 0 becomes the most recently used
    assert tier.put(key(3), payload(3)) is PutResult.STORED
    assert tier.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    assert not path_of(tmp_path, key(1)).exists()
    assert tier.stats.evictions == 1
    assert tier.drain_removed() == [key(1)]
    assert tier.drain_removed() == []

    os.utime(path_of(tmp_path, key(2)), (1, 1))  # oldest mtime: evicted first after a restart
    restarted = DiskTier(str(tmp_path), FP, 2 * entry)  # a smaller limit evicts at start
    assert restarted.contains([key(0), key(2), key(3)]) == [True, False, True]


def test_chunk_bigger_than_the_limit_is_skipped(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, CHUNK)  # the header does not fit next to the payload
    assert tier.put(key(1), payload(1)) is PutResult.SKIPPED
    assert tier.stats.skipped_writes == 1 and tier.stats.errors == 0


def test_room_reserved_by_writes_in_flight_skips_without_evicting(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(str(tmp_path), FP, 10_000 + 2 * HEADER_SIZE)
    assert tier.put(key(0), payload(0, 3000)) is PutResult.STORED
    release, entered = threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_replace(src, dst):
        if key(1).hex() in str(dst):
            entered.set()
            release.wait(5)
        real_replace(src, dst)

    monkeypatch.setattr(disk.os, "replace", slow_replace)
    writer = threading.Thread(target=tier.put, args=(key(1), payload(1, 6000)))
    writer.start()
    assert entered.wait(5)
    assert tier.put(key(2), payload(2, 5000)) is PutResult.SKIPPED  # 6000 in flight + 5000 > the limit
    assert tier.contains([key(0)]) == [True] and tier.stats.evictions == 0
    release.set()
    writer.join()
    assert tier.contains([key(0), key(1), key(2)]) == [True, True, False]


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    entry = HEADER_SIZE + CHUNK
    tier = DiskTier(str(tmp_path), FP, 20 * entry)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: tier.put(key(i), payload(i)), range(60)))
        results = list(pool.map(lambda i: read(tier, key(i)), range(60)))
    assert all(r is None or r == bytes(payload(i)) for i, r in enumerate(results))
    assert tier.stats.corrupt == 0 and tier.stats.errors == 0
    files = [p for p in tmp_path.rglob("*.kvo")]
    assert len(files) == sum(tier.contains([key(i) for i in range(60)])) <= 20


def test_cli_helpers_scan_verify_clear(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    for i in range(3):
        tier.put(key(i), payload(i))
    (tmp_path / "unrelated.txt").write_text("keep me")
    entries = disk.scan(str(tmp_path))
    assert sorted(e.key for e in entries) == [key(0), key(1), key(2)]
    assert {e.namespace for e in entries} == {FP.hex()[:16]}

    p = path_of(tmp_path, key(1))
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(data)
    report = disk.verify(str(tmp_path), fix=False)
    assert report.checked == 3 and [b[0] for b in report.bad] == [str(p)] and report.removed == 0
    assert p.exists()
    report = disk.verify(str(tmp_path), fix=True)
    assert report.removed == 1 and not p.exists()
    assert disk.verify(str(tmp_path), fix=False).bad == []

    assert disk.clear(str(tmp_path)) == 2
    assert disk.scan(str(tmp_path)) == []
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"


# ------------------------------------------------------------------ AsyncWriter over the disk tier


class _GatedDiskTier(DiskTier):
    """A disk tier whose stores wait for a gate: plays a slow disk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.batches: list[int] = []

    def put_many(self, items):
        self.gate.wait(5)
        self.batches.append(len(items))
        return super().put_many(items)


def test_writer_stores_in_the_background_and_drains_on_close(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path), FP, 10**6)
    writer = AsyncWriter(tier, max_pending=64, threads=2)
    results: dict[int, PutResult] = {}
    for i in range(20):
        writer.submit(key(i), payload(i), lambda r, i=i: results.__setitem__(i, r))
    writer.close()
    assert results == {i: PutResult.STORED for i in range(20)}
    assert all(read(tier, key(i)) == bytes(payload(i)) for i in range(20))


def test_writer_skips_at_once_when_full(tmp_path: Path) -> None:
    tier = _GatedDiskTier(str(tmp_path), FP, 10**6)
    writer = AsyncWriter(tier, max_pending=4)
    results: list[tuple[int, PutResult]] = []
    start = time.monotonic()
    for i in range(10):  # one is taken by the blocked thread, four wait in the queue
        writer.submit(key(i), payload(i), lambda r, i=i: results.append((i, r)))
    assert time.monotonic() - start < 0.5  # the caller never waited on the slow tier
    skipped = [i for i, r in results if r is PutResult.SKIPPED]
    assert len(skipped) >= 5 and tier.stats.skipped_writes == len(skipped)
    tier.gate.set()
    writer.close()
    assert len(results) == 10
    stored = [i for i, r in results if r is PutResult.STORED]
    assert sorted(stored + skipped) == list(range(10))
    assert max(tier.batches) > 1  # queued items went to put_many together


def test_writer_close_without_drain_answers_skipped(tmp_path: Path) -> None:
    tier = _GatedDiskTier(str(tmp_path), FP, 10**6)
    writer = AsyncWriter(tier, max_pending=8)
    results: list[PutResult] = []
    writer.submit(key(0), payload(0), results.append)
    time.sleep(0.05)  # the thread has taken it alone and waits at the gate
    for i in range(1, 5):
        writer.submit(key(i), payload(i), results.append)
    closer = threading.Thread(target=writer.close, kwargs={"drain": False})
    closer.start()
    time.sleep(0.05)
    tier.gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert results == [PutResult.SKIPPED] * 4 + [PutResult.STORED]
    writer.submit(key(9), payload(9), results.append)  # after close: skipped, not lost
    assert results[-1] is PutResult.SKIPPED and tier.contains([key(9)]) == [False]
