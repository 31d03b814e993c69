"""Configuration: sources, precedence, LMCache aliases, and every error path (API and CLI)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import redis

from kvoffload.config import KEYS, ConfigError, cluster_url, load_settings
from kvoffload.tiers.base import PutResult
from kvoffload.tiers.redis_tier import RedisTier
from tests.redis_server import RedisServer

#: This host's physical memory in GB, read here independently of kvoffload.
HOST_GB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def settings(extra=None, **env):
    return load_settings(extra, environ=env)


def test_defaults_match_the_documented_ones() -> None:
    s = settings()
    assert (s.chunk_size, s.local_cpu, s.max_local_cpu_size) == (256, True, 5.0)
    assert (s.local_disk, s.remote_url, s.save_decode_cache) == (None, None, False)
    assert set(s.sources.values()) == {"default"}
    assert s.cpu_pool_bytes == 5_000_000_000  # exact, no power-of-two rounding


def test_precedence_file_then_env_then_extra_config(tmp_path) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text("chunk_size: 512\nmax_local_cpu_size: 2\nsave_decode_cache: true\n")
    s = settings({"max_local_cpu_size": 3.5}, KVOFFLOAD_CONFIG_FILE=str(path), KVOFFLOAD_CHUNK_SIZE="1024",
                 KVOFFLOAD_MAX_LOCAL_CPU_SIZE="9")
    assert (s.chunk_size, s.max_local_cpu_size, s.save_decode_cache) == (1024, 3.5, True)
    assert s.sources["chunk_size"] == "env:KVOFFLOAD_CHUNK_SIZE"
    assert s.sources["max_local_cpu_size"] == "kv_connector_extra_config"
    assert s.sources["save_decode_cache"] == f"file:{path}"


def test_lmcache_files_and_variables_are_aliases(tmp_path, caplog) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n")
    with caplog.at_level("INFO", logger="kvoffload"):
        s = settings(LMCACHE_CONFIG_FILE=str(path), LMCACHE_USE_EXPERIMENTAL="True",
                     LMCACHE_MAX_LOCAL_CPU_SIZE="7.5", LMCACHE_LOCAL_DISK="file:///tmp/kvc/",
                     LMCACHE_MAX_LOCAL_DISK_SIZE="4")
    assert s.max_local_cpu_size == 7.5 and s.local_disk == "/tmp/kvc" and s.max_local_disk_size == 4
    notices = [r for r in caplog.records if "LMCache settings" in r.getMessage()]
    assert len(notices) == 1
    # our own variable wins over the LMCache alias
    assert settings(LMCACHE_CHUNK_SIZE="512", KVOFFLOAD_CHUNK_SIZE="128").chunk_size == 128


@pytest.mark.parametrize("extra, env, words", [
    ({"chunk_size": -1}, {}, ["'chunk_size'", "-1", "positive integer"]),
    ({"chunk_size": "abc"}, {}, ["'chunk_size'", "'abc'"]),
    ({"chunk_size": 2.5}, {}, ["'chunk_size'", "2.5"]),
    ({"max_local_cpu_size": -5}, {}, ["'max_local_cpu_size'", "-5", "GB > 0"]),
    ({"max_local_cpu_size": "nan"}, {}, ["'max_local_cpu_size'"]),
    ({"max_local_cpu_size": 0}, {}, ["max_local_cpu_size", "staging buffer"]),
    ({"local_cpu": "maybe"}, {}, ["'local_cpu'", "'maybe'", "true or false"]),
    ({"remote_url": "http://x:1"}, {}, ["'remote_url'", "redis://"]),
    ({"remote_url": "redis://host:notaport"}, {}, ["'remote_url'"]),
    ({"remote_timeout": 0}, {}, ["'remote_timeout'", "> 0"]),
    ({"copy_backend": "fast"}, {}, ["'copy_backend'", "auto, cuda or torch"]),
    ({"local_disk": "/tmp/x"}, {}, ["local_disk", "max_local_disk_size", "> 0"]),
    ({"local_cpu": False}, {}, ["local_cpu is false", "enable at least one tier"]),
    ({"chunk_sise": 256}, {}, ["unknown setting 'chunk_sise'", "did you mean 'chunk_size'"]),
    ({"enable_blending": True}, {}, ["CacheBlend", "does not have"]),
    ({}, {"KVOFFLOAD_CHUNK_SIZE": "0"}, ["'chunk_size'", "env:KVOFFLOAD_CHUNK_SIZE"]),
    ({}, {"KVOFFLOAD_MAX_LOCAL_CPU": "5"}, ["KVOFFLOAD_MAX_LOCAL_CPU", "did you mean 'max_local_cpu_size'"]),
    ({}, {"LMCACHE_USE_LAYERWISE": "True"}, ["layer-wise", "does not have"]),
    ({}, {"KVOFFLOAD_CONFIG_FILE": "/nonexistent/kv.yaml"}, ["cannot read the config file", "/nonexistent/kv.yaml"]),
])
def test_bad_values_name_key_value_and_accepted_form(extra, env, words) -> None:
    with pytest.raises(ConfigError) as err:
        settings(extra, **env)
    for word in words:
        assert word in str(err.value)


def test_bad_yaml_file_is_an_error(tmp_path) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text("chunk_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        settings(KVOFFLOAD_CONFIG_FILE=str(path))
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        settings(KVOFFLOAD_CONFIG_FILE=str(path))


def test_password_is_redacted() -> None:
    s = settings({"remote_url": "redis://:s3cret@127.0.0.1:6379/0"})
    assert s.remote_password == "s3cret"
    assert "s3cret" not in json.dumps(s.redacted())
    assert settings({"remote_url": "redis://127.0.0.1:6379"}, KVOFFLOAD_REMOTE_PASSWORD="pw").remote_password == "pw"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVOFFLOAD_", "LMCACHE_"))}
    return subprocess.run([sys.executable, "-m", "kvoffload.cli", *args], capture_output=True, text=True,
                          env={**clean, **env})


def test_cli_config_prints_values_and_sources() -> None:
    proc = _cli("config", "--json", "--extra-config", '{"chunk_size": 512}', KVOFFLOAD_MAX_LOCAL_CPU_SIZE="12")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == set(KEYS)
    assert data["chunk_size"] == {"value": 512, "source": "kv_connector_extra_config"}
    assert data["max_local_cpu_size"] == {"value": 12.0, "source": "env:KVOFFLOAD_MAX_LOCAL_CPU_SIZE"}
    table = _cli("config", KVOFFLOAD_REMOTE_PASSWORD="x", KVOFFLOAD_REMOTE_URL="redis://:pw@h:1/0")
    assert "env:KVOFFLOAD_REMOTE_URL" in table.stdout and "pw@" not in table.stdout


@pytest.mark.parametrize("env, extra, words", [
    ({"KVOFFLOAD_CHUNK_SIZE": "-3"}, None, ["'chunk_size'", "-3"]),
    ({"KVOFFLOAD_CHUNCK_SIZE": "256"}, None, ["did you mean 'chunk_size'"]),
    ({}, '{"max_local_cpu_size": "lots"}', ["'max_local_cpu_size'", "'lots'"]),
    ({}, "{not json", ["not valid JSON"]),
])
def test_cli_config_errors_exit_2_without_traceback(env, extra, words) -> None:
    proc = _cli("config", *(["--extra-config", extra] if extra else []), **env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr


def test_cli_serve_builds_the_vllm_command_and_validates_first() -> None:
    from kvoffload.cli import serve_command
    cmd = serve_command("Qwen/Qwen3-8B", ["--port", "8000"], 2.0, python="python")
    transfer = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert cmd[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen3-8B"]
    assert transfer == {"kv_connector": "KVOffloadConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"max_local_cpu_size": 2.0}}
    proc = _cli("serve", "m", "--cpu-size", "-1")
    assert proc.returncode == 2 and "max_local_cpu_size" in proc.stderr
    proc = _cli("serve", "m", "--kv-transfer-config", "{}")
    assert proc.returncode == 2 and "sets --kv-transfer-config itself" in proc.stderr


def test_pool_smaller_than_one_chunk_is_an_error_naming_the_key() -> None:
    from kvoffload.vllm.identity import slots_per_worker

    s = settings({"max_local_cpu_size": 0.001})
    assert slots_per_worker(s, world_size=2, slot_bytes=100_000) == 5  # 1 MB split over 2 ranks
    with pytest.raises(ConfigError) as err:
        slots_per_worker(s, world_size=1, slot_bytes=37_748_736)
    assert "'max_local_cpu_size'" in str(err.value) and "0.038 GB" in str(err.value)


# ---------------------------------------------------------------- values accepted, then raw errors later


def _error(extra=None, **env) -> str:
    with pytest.raises(ConfigError) as err:
        settings(extra, **env)
    return str(err.value)


@pytest.mark.parametrize("gb", [round(0.95 * HOST_GB, 1), 10**6])
def test_cpu_pool_larger_than_host_memory_is_refused_at_load(gb) -> None:
    message = _error({"max_local_cpu_size": gb})
    for word in ("'max_local_cpu_size'", "(from kv_connector_extra_config)", f"this host has {HOST_GB:.1f} GB",
                 f"at most {0.9 * HOST_GB:.1f} GB"):
        assert word in message
    assert "env:KVOFFLOAD_MAX_LOCAL_CPU_SIZE" in _error(KVOFFLOAD_MAX_LOCAL_CPU_SIZE=str(gb))
    assert settings({"max_local_cpu_size": round(0.5 * HOST_GB, 1)}).max_local_cpu_size == round(0.5 * HOST_GB, 1)


def test_cpu_pool_range_is_stated_one_way() -> None:
    """The accepted form (also the docs' settings table) is what every refusal of the key says."""
    accepted = KEYS["max_local_cpu_size"].accepted
    assert "GB > 0" in accepted and "90%" in accepted
    for value in (-5, 0, "0", 10**6):
        assert f"expected {accepted}" in _error({"max_local_cpu_size": value})


@pytest.mark.parametrize("value", [1e300, "1e300", 3601, "inf", -1])
def test_remote_timeout_is_bounded(value) -> None:
    message = _error({"remote_timeout": value})
    assert "'remote_timeout'" in message and "<= 3600" in message and "kv_connector_extra_config" in message


@pytest.mark.parametrize("value", [1e17, 2**31, "1e300"])
def test_remote_ttl_is_bounded(value) -> None:
    message = _error(KVOFFLOAD_REMOTE_TTL=str(value))
    assert "'remote_ttl'" in message and "2147483647" in message and "env:KVOFFLOAD_REMOTE_TTL" in message


def test_longest_timeout_and_ttl_work_on_a_real_server(redis_server: RedisServer) -> None:
    """The bounds are ones the socket layer and Redis's SET … PX accept (1e17 s made every SET fail)."""
    s = settings({"remote_url": redis_server.url, "remote_timeout": 3600, "remote_ttl": 2**31 - 1})
    tier = RedisTier(s.remote_url, bytes(32), None, s.remote_timeout, s.remote_ttl)
    try:
        assert tier.put((1).to_bytes(32, "big"), memoryview(b"x" * 64)) == PutResult.STORED
        client = redis.Redis.from_url(redis_server.url)
        (name,) = client.keys("kvoffload:*")
        assert client.ttl(name) > 2**31 - 10
    finally:
        tier.close()


@pytest.mark.parametrize("url, words", [
    ("redis://:s3cret@h:6379/99", ["database '99'", "0 to 15", "databases 16"]),
    ("redis://h:6379/0?db=16", ["db='16'", "0 to 15"]),
    ("redis://h:6379/abc", ["database 'abc'"]),
    ("redis://h:6379/0?socket_timeout=abc", ["socket_timeout='abc'", "number of seconds"]),
    ("redis://h:6379/0?socket_connect_timeout=1e300", ["socket_connect_timeout='1e300'", "<= 3600"]),
    ("redis://h:6379/0?socket_keepalive=maybe", ["socket_keepalive='maybe'", "true or false"]),
    ("redis://h:6379/0?retry_on_timeout=true", ["unknown query option 'retry_on_timeout'", "socket_timeout"]),
    ("redis://h:6379/0?ssl_cert_reqs=none", ["unknown query option 'ssl_cert_reqs'", "with rediss://"]),
    ("rediss://h:6379/0?ssl_cert_reqs=sometimes", ["ssl_cert_reqs='sometimes'", "none, optional or required"]),
])
def test_remote_url_database_and_query_options_are_checked(url, words) -> None:
    message = _error({"remote_url": url})
    assert "'remote_url'" in message and "(from kv_connector_extra_config)" in message
    assert "s3cret" not in message  # the password is masked in the error too
    for word in words:
        assert word in message


@pytest.mark.parametrize("url", [
    "redis://h:6379", "redis://h:6379/", "redis://h:6379/15?socket_timeout=0.2&socket_keepalive=true",
    "rediss://h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false",
    "valkeys://h:6380/3",
])
def test_valid_remote_urls_are_accepted_and_redis_py_reads_them(url) -> None:
    assert settings({"remote_url": url}).remote_url == url
    redis.connection.parse_url(url.replace("valkeys://", "rediss://"))  # would raise on what we let through


@pytest.mark.parametrize("url, words", [
    ("redis+cluster:///", ["no nodes"]),
    ("redis+cluster://:s3cret@/", ["no nodes"]),
    ("redis+cluster://a:7000,,b:7001/", ["node '' has no host"]),
    ("redis+cluster://a:7000,b:x/", ["node 'b:x'", "port"]),
    ("redis+cluster://a:70000/", ["node 'a:70000'", "port"]),
    ("redis+cluster://a:0/", ["node 'a:0'", "port"]),
    ("redis+cluster://:s3cret@a:7000/1", ["database '1'", "database 0 only"]),
    ("valkey+cluster://a:7000/0?db=0", ["unknown query option 'db'", "socket_timeout"]),
    ("redis+cluster://a:7000/?retry_on_timeout=yes", ["unknown query option 'retry_on_timeout'"]),
    ("redis+cluster://a:7000/?ssl_cert_reqs=none", ["unknown query option 'ssl_cert_reqs'", "rediss+cluster://"]),
    ("rediss+cluster://a:7000/?socket_timeout=-1", ["socket_timeout='-1'", "number of seconds"]),
])
def test_bad_cluster_urls_are_config_errors(url, words) -> None:
    message = _error({"remote_url": url})
    assert "'remote_url'" in message and "s3cret" not in message
    for word in words:
        assert word in message


def test_cluster_url_nodes_and_node_urls() -> None:
    url = "rediss+cluster://user:pw@a:7000,[::1]:7001,b/?ssl_cert_reqs=none&socket_timeout=0.2"
    assert settings({"remote_url": url}).remote_password == "pw"
    parts = cluster_url(url)
    assert parts.nodes == (("a", 7000), ("::1", 7001), ("b", 6379))
    node = parts.node_url("::1", 7001)
    assert node == "rediss://user:pw@[::1]:7001/0?ssl_cert_reqs=none&socket_timeout=0.2"
    assert settings({"remote_url": node}).remote_url == node  # each node's URL passes the one-server checks
    for scheme in ("redis+cluster", "valkey+cluster", "valkeys+cluster"):
        assert settings({"remote_url": f"{scheme}://h:1/"}).remote_url == f"{scheme}://h:1/"
    with pytest.raises(ConfigError, match="remote_url 'redis\\+cluster://:\\*\\*\\*@a:1/3': database '3'"):
        cluster_url("redis+cluster://:pw@a:1/3")


@pytest.mark.parametrize("extra", [[1, 2], "x", 5])
def test_extra_config_that_is_not_a_mapping_is_a_config_error(extra) -> None:
    message = _error(extra)
    assert "kv_connector_extra_config must be a mapping" in message and type(extra).__name__ in message


def test_infinite_chunk_size_is_a_config_error() -> None:
    assert "'chunk_size'" in _error({"chunk_size": float("inf")})


def test_lmcache_feature_set_to_false_is_accepted_with_a_note(tmp_path, caplog) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nuse_layerwise: false\nenable_blending: 0\n")
    with caplog.at_level(logging.INFO, logger="kvoffload"):
        s = settings({"enable_pd": False}, LMCACHE_CONFIG_FILE=str(path), LMCACHE_ENABLE_P2P="False",
                     LMCACHE_GDS_PATH="")
    assert s == settings()
    notes = " ".join(r.getMessage() for r in caplog.records if r.levelno <= logging.INFO)
    for word in ("use_layerwise", "enable_blending", "LMCACHE_ENABLE_P2P", "enable_pd", "LMCACHE_GDS_PATH"):
        assert word in notes
    # a true value still turns the feature on, and is still refused
    assert "peer-to-peer" in _error(LMCACHE_ENABLE_P2P="True")
    path.write_text("use_layerwise: true\n")
    assert "layer-wise" in _error(LMCACHE_CONFIG_FILE=str(path))


@pytest.mark.parametrize("env, extra, words", [
    ({}, '{"max_local_cpu_size": 1000000}', ["'max_local_cpu_size'", "this host has"]),
    ({"KVOFFLOAD_REMOTE_TIMEOUT": "1e300"}, None, ["'remote_timeout'", "env:KVOFFLOAD_REMOTE_TIMEOUT"]),
    ({"KVOFFLOAD_REMOTE_URL": "redis://h:1/99"}, None, ["'remote_url'", "0 to 15"]),
    ({"KVOFFLOAD_REMOTE_URL": "redis://h:1/0?socket_timeout=abc"}, None, ["'remote_url'", "socket_timeout"]),
    ({"KVOFFLOAD_REMOTE_TTL": "1e17"}, None, ["'remote_ttl'", "2147483647"]),
    ({}, "[1,2]", ["kv_connector_extra_config must be a mapping", "list"]),
    ({"LMCACHE_ENABLE_P2P": "True"}, None, ["LMCACHE_ENABLE_P2P", "does not have"]),
])
def test_cli_config_refuses_what_the_engine_would_fail_on(env, extra, words) -> None:
    proc = _cli("config", *(["--extra-config", extra] if extra else []), **env)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr


def test_cli_config_says_what_only_the_engine_checks() -> None:
    proc = _cli("config", "--json", "--extra-config", '{"chunk_size": 100}', LMCACHE_ENABLE_P2P="False")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["chunk_size"]["value"] == 100  # the note leaves stdout JSON
    assert "checked only when the engine starts" in proc.stderr
    assert "chunk_size 100 must be a multiple of the engine's KV block size" in proc.stderr
