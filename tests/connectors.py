"""Test-only connector variants, selected through ``kv_connector_module_path``.

They exist to prove that the real tests are real: if loading is disabled the outputs must change, and
the keys an engine computes must be the same after a restart.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from kvoffload.transfer.base import DoneFence, Fence
from kvoffload.vllm.connector import KVOffloadConnector
from kvoffload.vllm.identity import GroupSlot
from kvoffload.vllm.worker import OffloadWorker


class NoLoadConnector(KVOffloadConnector):
    """Claims the same hits as the real connector but writes zeros instead of the stored KV.

    ``zero_ranks`` limits that to some tensor-parallel ranks (all of them when None). The load still goes
    through the worker (and is reported finished), only the copy itself is replaced.
    """

    zero_ranks: frozenset[int] | None = None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        worker: OffloadWorker = self._worker
        backend = worker._copy_path()
        zero_here = self.zero_ranks is None or worker.rank in self.zero_ranks
        if zero_here and not getattr(backend, "zeroing", False):
            def zero(block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
                for layer in worker.kv.layers:
                    layer[block_ids] = 0
                return DoneFence()

            backend.load = zero  # type: ignore[method-assign]
            backend.zeroing = True
        super().start_load_kv(forward_context, **kwargs)


class Rank1ZeroLoadConnector(NoLoadConnector):
    """Tensor-parallel negative control: rank 1 claims its loads but writes zeros; rank 0 loads."""

    zero_ranks = frozenset({1})


class KeyLogConnector(KVOffloadConnector):
    """Appends each request's chunk keys to the file named by KVO_TEST_KEY_LOG."""

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        result = super().get_num_new_matched_tokens(request, num_computed_tokens)
        state = self._scheduler._requests.get(request.request_id)
        if state is not None:
            keys = [k.hex() for k in state.prompt_keys] + ([state.tail_key.hex()] if state.tail_key else [])
            with open(os.environ["KVO_TEST_KEY_LOG"], "a") as log:
                log.write(json.dumps({"prompt": list(request.prompt_token_ids[:8]), "keys": keys}) + "\n")
        return result


class ZeroGroupLoadConnector(KVOffloadConnector):
    """Hybrid-model negative control: loads every group as the real connector does, then zeroes the blocks it
    loaded for the KV cache groups that ``zeroed`` selects. If those pages did not matter, or were not the ones the
    model reads, outputs would stay the same."""

    @staticmethod
    def zeroed(group: GroupSlot) -> bool:
        raise NotImplementedError

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)  # on a CPU cache the copies are done on return
        plan, worker = self._bound_plan(), self._worker
        if plan is None:
            return
        pages = [(g.first_page, g.first_page + g.num_pages) for g in worker.slot_layout.groups if self.zeroed(g)]
        ids = [block for copies in plan.loads for chunk in copies.chunks
               for block, page in zip(chunk.block_ids, chunk.page_list())
               if any(first <= page < end for first, end in pages)]
        if ids:
            for layer in worker.kv.layers:
                layer[torch.tensor(ids, dtype=torch.int64)] = 0


class ZeroSlidingLoadConnector(ZeroGroupLoadConnector):
    """Zeroes the sliding-window groups' loaded blocks (their window)."""

    @staticmethod
    def zeroed(group: GroupSlot) -> bool:
        return group.window is not None


class ZeroStateLoadConnector(ZeroGroupLoadConnector):
    """Zeroes the loaded Mamba/linear-attention state: the hit's attention KV is right, its recurrent state not."""

    @staticmethod
    def zeroed(group: GroupSlot) -> bool:
        return group.state
