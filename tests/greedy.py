"""One comparison of greedy outputs for every end-to-end test, aware of the tiny model's near-ties.

The tiny random-weight model has near-ties: at some positions the two most likely tokens differ by a few
thousandths of a nat (one was measured at -8.7045 against -8.7084). Which one greedy decoding picks there
can change with the batch's shape alone (another accumulation order in the matmuls), with or without
kvoffload. So outputs are compared token by token against a baseline run that recorded its top-2 logprobs:
identical ids, except that a position where the **baseline's** top-2 margin is below ``TIE_TOLERANCE``
ends the comparison of that prompt (a tie: counted and reported, not a failure). A difference anywhere
else is a failure. Wrong KV (zeros, another model's bytes, another adapter's) changes tokens at positions
with large margins, so negative controls keep failing: :func:`differs_beyond_ties` says whether a run
differs at such a position.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

#: Top-2 logprob margin (nats) below which a baseline position counts as a near-tie. The tiny model's bf16
#: logits come in steps of 1/256 (0.0039) at their magnitude, and batch shape moves them by one such step
#: (the flips seen: margins 0.0000 and 0.0039); two steps are tolerated. Wrong KV (zeros in one TP rank's
#: shard) first changes tokens at margins of 0.035 and more, so negative controls keep failing.
TIE_TOLERANCE = 0.01


@dataclass
class Comparison:
    mismatches: list[str]  # prompt index, position, tokens and the baseline's margin there
    ties: list[str]  # comparisons ended at a near-tie

    @property
    def same(self) -> bool:
        return not self.mismatches


def compare(actual: Sequence[Sequence[int]], expected: Sequence[Sequence[int]],
            margins: Sequence[Sequence[float]], tolerance: float = TIE_TOLERANCE) -> Comparison:
    """Compare each prompt's generated ids with the baseline's (``expected``, its per-position ``margins``)."""
    if len(actual) != len(expected):
        return Comparison([f"{len(actual)} outputs, expected {len(expected)}"], [])
    result = Comparison([], [])
    for prompt, (got, want, margin) in enumerate(zip(actual, expected, margins)):
        for position, (a, b) in enumerate(zip(got, want)):
            if a == b:
                continue
            where = f"prompt {prompt}, token {position}: {a} instead of {b} (baseline top-2 margin {margin[position]:.4f})"
            (result.ties if margin[position] < tolerance else result.mismatches).append(where)
            break
        else:
            if len(got) != len(want):
                result.mismatches.append(f"prompt {prompt}: {len(got)} tokens, expected {len(want)}")
    return result


def _select(baseline: Any, prompts: Sequence[int] | None, round_: int) -> tuple[list, list]:
    ids, margins = baseline.rounds[round_], baseline.margins[round_]
    if prompts is None:
        return ids, margins
    return [ids[p] for p in prompts], [margins[p] for p in prompts]


def assert_same_greedy(actual: Sequence[Sequence[int]], baseline: Any, prompts: Sequence[int] | None = None,
                       what: str = "outputs differ from the baseline", round_: int = 0) -> Comparison:
    """Fail unless ``actual`` equals the baseline run's outputs (``prompts``: which of its prompts, in order)
    up to near-ties; ties are reported as a warning."""
    expected, margins = _select(baseline, prompts, round_)
    result = compare(actual, expected, margins)
    assert result.same, f"{what}: " + "; ".join(result.mismatches)
    if result.ties:
        warnings.warn("greedy comparison ended at near-ties: " + "; ".join(result.ties), stacklevel=2)
    return result


def differs_beyond_ties(actual: Sequence[Sequence[int]], baseline: Any, prompts: Sequence[int] | None = None,
                        round_: int = 0) -> bool:
    """For negative controls: True if ``actual`` differs from the baseline at a position that is no near-tie."""
    expected, margins = _select(baseline, prompts, round_)
    return not compare(actual, expected, margins).same
