"""Model and adapter identity: KV stored for one set of weights is never served for another.

Unit level: :func:`kvoffload.model_digest.digest_directory` on real files (safetensors written with the
``safetensors`` package). End to end (marked ``vllm``): a disk tier filled by one engine, then the weights
overwritten in place or ``hf_overrides`` changed: the next engine on the same path and directory must find
nothing on disk and answer as the new model does; unchanged, it hits (the control).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvoffload.model_digest import UnreadableModel, digest_directory
from tests.conftest import run_engine
from tests.greedy import assert_same_greedy
from tests.tiny_model import write_tiny_model


def write_model(path: Path, value: float = 1.0, scale: float = 0.5) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama", "rope_theta": 10000.0}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    save_file({"layer.weight": torch.full((64, 64), value), "layer.k_scale": torch.tensor([scale])},
              str(path / "model.safetensors"))
    return path


def test_same_files_at_another_path_have_the_same_digest(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert digest_directory(str(a)) == digest_directory(str(b))  # a fleet serving copies shares KV


@pytest.mark.parametrize("change", ["weights", "kv scale", "config"])
def test_changed_weights_scales_or_config_change_the_digest(tmp_path: Path, change: str) -> None:
    model = write_model(tmp_path / "m")
    before = digest_directory(str(model))
    if change == "weights":
        write_model(model, value=2.0)  # retrained in place: same names, shapes and sizes
    elif change == "kv scale":
        write_model(model, scale=0.25)
    else:
        (model / "config.json").write_text('{"model_type": "llama", "rope_theta": 500000.0}')
    assert digest_directory(str(model)) != before


def test_tokenizer_files_do_not_change_the_digest(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    before = digest_directory(str(model))
    (model / "tokenizer.json").write_text('{"version": "2.0"}')  # KV is keyed by token ids, not text
    assert digest_directory(str(model)) == before


def test_a_directory_without_weights_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnreadableModel):
        digest_directory(str(tmp_path))


# ---- end to end -------------------------------------------------------------------------------------

PROMPT = " ".join(str(i) for i in range(2000, 3300))  # 5 whole chunks and a tail


def disk_spec(model: str, disk: Path, **engine) -> dict:
    return {"model": model, "prompts": [PROMPT], "rounds": 1, "connector": "plugin", "engine": engine,
            "extra_config": {"local_disk": str(disk), "max_local_disk_size": 1, "max_local_cpu_size": 0.05}}


@pytest.mark.vllm
@pytest.mark.parametrize("change", ["unchanged", "weights overwritten in place", "hf_overrides rope_theta"])
def test_restart_on_another_model_at_the_same_path_loads_nothing(tmp_path: Path, change: str) -> None:
    model = write_tiny_model(tmp_path / "model")
    disk = tmp_path / "disk"
    first = run_engine(disk_spec(str(model), disk))
    assert first.hit_tokens() == [0]
    engine: dict = {}
    if change == "weights overwritten in place":
        other = write_tiny_model(tmp_path / "other", seed=1)
        shutil.copy(other / "model.safetensors", model / "model.safetensors")
    elif change == "hf_overrides rope_theta":
        engine = {"hf_overrides": {"rope_theta": 12345.0}}
    baseline = run_engine({"model": str(model), "prompts": [PROMPT], "rounds": 1, "engine": engine})
    second = run_engine(disk_spec(str(model), disk, **engine))
    assert_same_greedy(second.rounds[0], baseline, what=f"{change}: the restarted engine answered wrongly")
    if change == "unchanged":  # the control: the same model finds its prefix on disk
        assert second.hit_tokens()[0] >= 5 * 256
    else:
        assert second.hit_tokens() == [0], f"{change}: KV stored for the old model was offered"
