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


def test_0_33_is_accepted_and_0_34_wants_resumed_req_ids_gone() -> None:
    """0.33 reads the same fields as 0.32; 0.34 re-sends resumed requests as new ones (resumed_req_ids is gone), so
    a "0.34" whose CachedRequestData still has the field (here: 0.32's) is refused rather than half-read."""
    assert compat.check("0.33.0") == (0, 33)
    with pytest.raises(compat.UnsupportedVLLM, match="0.34.0's CachedRequestData still has resumed_req_ids"):
        compat.check("0.34.0")


def test_resumed_req_ids_come_from_the_cached_requests_before_0_34(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = compat.CachedRequestData.make_empty()
    cached.resumed_req_ids = {"a"}
    assert set(compat.resumed_req_ids(cached)) == {"a"}
    monkeypatch.setattr(compat, "RESUMED_AS_NEW", True)
    assert not compat.resumed_req_ids(cached)  # 0.34: resumed requests are in scheduled_new_reqs
