"""The vLLM release probe: a known release passes, anything else is refused with a message naming it."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("vllm")

from kvoffload.vllm import compat  # noqa: E402


def test_installed_release_is_supported() -> None:
    import vllm

    assert compat.check(vllm.__version__) == compat.VLLM_RELEASE


@pytest.mark.parametrize("version", ["0.25.1", "0.35.0", "1.0.0", "nightly"])
def test_unknown_release_is_refused_naming_it(version: str) -> None:
    with pytest.raises(compat.UnsupportedVLLM, match=version):
        compat.check(version)


def test_release_whose_fields_changed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that renamed a field kvoffload reads would otherwise stop seeing preemptions silently."""
    @dataclasses.dataclass
    class RenamedOutput:
        scheduled_new_reqs: list
        preempted: set  # was preempted_req_ids

    monkeypatch.setattr(compat, "REQUIRED_FIELDS", {RenamedOutput: compat.REQUIRED_FIELDS[compat.SchedulerOutput]})
    with pytest.raises(compat.UnsupportedVLLM, match="preempted_req_ids"):
        compat.check("0.32.0")
