"""``kvoffload cache ls|verify|clear`` run as a user would: a subprocess, its output and exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from kvoffload.tiers.disk import HEADER_SIZE, DiskTier
from kvoffload.tiers.redis_tier import RedisTier
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
FP = bytes(range(32))
OTHER_FP = bytes(range(1, 33))
CHUNK = 4096

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVOFFLOAD_", "LMCACHE_"))}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), clean.get("PYTHONPATH", "")])
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvoffload.cli", "cache", *args], capture_output=True, text=True,
                          env=clean, stdin=subprocess.DEVNULL, timeout=60)


def fill_disk(root: Path) -> None:
    mine, other = DiskTier(str(root), FP, 10**7), DiskTier(str(root), OTHER_FP, 10**7)
    for i in range(3):
        mine.put(i.to_bytes(32, "big"), memoryview(bytes([i]) * CHUNK))
    other.put(b"\x07" * 32, memoryview(b"\x07" * CHUNK))


def test_ls_per_namespace(tmp_path: Path) -> None:
    fill_disk(tmp_path)
    result = run_cli("ls", "--path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"disk {tmp_path}"
    row = next(line.split() for line in lines if line.strip().startswith(FP.hex()[:16]))
    assert row[1] == "3" and row[2:4] == [f"{3 * (HEADER_SIZE + CHUNK) / 1e3:.2f}", "kB"]
    assert any(line.strip().startswith(OTHER_FP.hex()[:16]) for line in lines)
    assert next(line.split() for line in lines if line.strip().startswith("total"))[1] == "4"


def test_verify_reports_fixes_and_sets_exit_status(tmp_path: Path) -> None:
    fill_disk(tmp_path)
    bad = next(tmp_path.rglob("*.kvo"))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(data)

    result = run_cli("verify", "--path", str(tmp_path))
    assert result.returncode == 1
    assert f"bad: {bad}: payload checksum mismatch" in result.stdout
    assert "4 chunks checked, 1 bad, 0 removed" in result.stdout and bad.exists()

    result = run_cli("verify", "--path", str(tmp_path), "--fix")
    assert result.returncode == 0 and "1 removed" in result.stdout and not bad.exists()
    assert run_cli("verify", "--path", str(tmp_path)).returncode == 0


def test_clear_needs_yes_when_not_interactive(tmp_path: Path) -> None:
    fill_disk(tmp_path)
    result = run_cli("clear", "--path", str(tmp_path))
    assert result.returncode == 2 and "without --yes" in result.stderr
    assert len(list(tmp_path.rglob("*.kvo"))) == 4
    result = run_cli("clear", "--path", str(tmp_path), "--yes")
    assert result.returncode == 0 and "removed 4 files" in result.stdout
    assert list(tmp_path.rglob("*.kvo")) == []


def test_default_target_is_the_configured_local_disk(tmp_path: Path) -> None:
    fill_disk(tmp_path)
    env = {"KVOFFLOAD_LOCAL_DISK": str(tmp_path), "KVOFFLOAD_MAX_LOCAL_DISK_SIZE": "1"}
    result = run_cli("ls", env=env)
    assert result.returncode == 0 and f"disk {tmp_path}" in result.stdout


def test_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    result = run_cli("ls", env={"KVOFFLOAD_LOCAL_DISK": str(tmp_path)})  # no max_local_disk_size
    assert result.returncode == 2
    assert "max_local_disk_size" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("verify")
    assert result.returncode == 2 and "--path DIR" in result.stderr and "Traceback" not in result.stderr


def test_remote_ls_and_clear(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, FP, None, 1.0, None)
    tier.put_many([(i.to_bytes(32, "big"), memoryview(bytes([i]) * CHUNK)) for i in range(2)])
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(b"unrelated", b"keep")

    result = run_cli("ls", "--remote", redis_server.url)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:2] == [FP.hex()[:16], "2"] for line in result.stdout.splitlines()[1:])
    result = run_cli("clear", "--yes", env={"KVOFFLOAD_REMOTE_URL": redis_server.url})
    assert result.returncode == 0 and "removed 2 chunks" in result.stdout
    assert raw.keys() == [b"unrelated"]


def test_remote_ls_and_clear_on_a_cluster(redis_cluster: RedisCluster) -> None:
    tier = RedisTier(redis_cluster.url, FP, None, 1.0, None)
    tier.put_many([(i.to_bytes(32, "big"), memoryview(bytes([i]) * CHUNK)) for i in range(12)])
    tier.close()
    result = run_cli("ls", "--remote", redis_cluster.url)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:2] == [FP.hex()[:16], "12"] for line in result.stdout.splitlines()[1:])
    result = run_cli("clear", "--yes", "--remote", redis_cluster.url)
    assert result.returncode == 0 and "removed 12 chunks" in result.stdout
    assert sum(redis_cluster.client(i).dbsize() for i in range(3)) == 0


def test_remote_password_is_masked_and_unreachable_is_exit_1() -> None:
    secret = "hunter2-secret"
    with RedisServer(password=secret) as server:
        url = server.url.replace("redis://", f"redis://:{secret}@")
        result = run_cli("ls", "--remote", url)
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout and ":***@" in result.stdout
        server.stop()
        result = run_cli("ls", "--remote", url)
    assert result.returncode == 1 and "cannot" not in result.stdout
    assert "failed" in result.stderr and secret not in result.stderr and "Traceback" not in result.stderr
