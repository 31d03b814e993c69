"""Configuration: sources, precedence, LMCache aliases, and every error path (API and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvoffload.config import KEYS, ConfigError, load_settings


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
    ({"max_local_cpu_size": -5}, {}, ["'max_local_cpu_size'", "-5", "GB >= 0"]),
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
    import os
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
    cmd = serve_command("Qwen/Qwen3-8B", ["--port", "8000"], 20.0, python="python")
    transfer = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert cmd[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen3-8B"]
    assert transfer == {"kv_connector": "KVOffloadConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"max_local_cpu_size": 20.0}}
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
