"""CUDA graphs for the PDM step (``draft.cuda_graphs=true``).

A PDM step runs R rows (the pending completed token, the in-flight tokens, the newest one) at
positions [start, start + R) through the PDM's layers over its own KV cache, then the final norm
and head on the newest row. R takes few values (n + 1 in the steady state, fewer while the
pipeline refills), so one graph is captured per R; the positions are a device tensor and
attention spans the whole static cache (``target/cuda_graphs.py``: the PDM's layers are built
with ``StaticPositionSelfAttention``), so one graph serves every position.

Outside the graph stay the per-row aggregation (``row_input``: which projection a row takes
depends on its depth) and the token choice (greedy argmax, or sampling on the host). The graph
writes all R rows into the cache; the draft keeps only the completed ones by moving the cache
length, exactly as the eager step does. ``PDMGraphs(module, capture=False)`` runs the same
static-shape step eagerly, which is how the CPU tests check it. Any capture failure logs one
warning and the PDM runs eagerly from then on.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from spd_megatron.target.cuda_graphs import (
    agree_across,
    alone,
    capture_checked,
    static_decode_mask,
    why_no_graphs,
    zero_cache_tail,
)

log = logging.getLogger(__name__)


class PDMGraphs:
    """The PDM's layers + head on R rows at a static shape, one CUDA graph per R.

    Args:
        module: a PipelineDraftModule (its layers carry the static-position attention).
        capture: True (CUDA): capture once per R, then replay. False: run the static step eagerly.
    """

    def __init__(self, module, capture: bool = True) -> None:
        self.module, self.capture = module, capture
        self.device = module.head.weight.device
        self.dtype = module.head.weight.dtype
        self.key_positions = torch.arange(module.cache.max_seq_len, device=self.device)  # [Smax]
        self.dummy_ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # no embedding
        self.inputs: dict[int, tuple[Tensor, Tensor]] = {}  # R -> (positions [R], rows [R, 1, h])
        self.graphs: dict[int, tuple] = {}  # R -> (graph, logits [V_d] in the graph's memory)
        self.pool = None
        self.disabled: Optional[str] = None
        self._cache_zeroed = False
        self.agree = alone  # TP ranks agree on graphs vs eager (make_pdm_graphs sets it)

    def step(self, rows: Tensor, start: int) -> Optional[Tensor]:
        """Rows [R, 1, h] at [start, start + R) -> the newest row's logits [V_d], or None (eager)."""
        cache = self.module.cache
        if self.disabled or not cache.context.key_value_memory_dict:
            return None  # the prompt's rows (eager) allocate the cache
        count = rows.shape[0]
        cache.prepare_write(start, count)
        if not self._cache_zeroed:
            zero_cache_tail(cache)
            self._cache_zeroed = True
        positions, buf = self._inputs(count)
        torch.arange(start, start + count, out=positions)
        buf.copy_(rows)
        logits = self._replay(count) if self.capture else self._static_forward(count)
        if logits is not None:
            cache.commit_write(start, count)
        return logits

    def disable(self, reason: str) -> None:
        self.disabled = reason
        self.graphs.clear()
        log.warning("draft.cuda_graphs: %s; the PDM runs eagerly", reason)

    def _inputs(self, count: int) -> tuple[Tensor, Tensor]:
        if count not in self.inputs:
            hidden = self.module.arch.hidden_size
            self.inputs[count] = (torch.zeros(count, dtype=torch.long, device=self.device),  # [R]
                                  torch.zeros(count, 1, hidden, dtype=self.dtype, device=self.device))
        return self.inputs[count]

    def _static_forward(self, count: int) -> Tensor:
        module = self.module
        positions, rows = self.inputs[count]
        context = module.cache.context
        mask = static_decode_mask(self.key_positions, positions)  # [1, 1, R, Smax]
        module.layers.set_input_tensor(rows)
        context.static_position = positions
        try:
            hidden = module.layers(self.dummy_ids, None, mask, inference_context=context,
                                   runtime_gather_output=True)  # [R, 1, h]
        finally:
            context.static_position = None
        return module.logits(hidden[-1, 0]).float()  # [V_d]

    def _replay(self, count: int) -> Optional[Tensor]:
        captured = self.graphs.get(count)
        if captured is None:
            try:
                graph, logits = capture_checked(lambda: self._static_forward(count), self.pool, self.agree)
            except Exception as err:  # noqa: BLE001 - any failure: run eagerly instead
                self.disable(f"capture of the {count}-row step failed "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160]})")
                return None
            self.pool = graph.pool()
            captured = self.graphs[count] = (graph, logits)
        graph, logits = captured
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's own output


def make_pdm_graphs(module, tp_size: int, backend: str, tp_group=None) -> Optional[PDMGraphs]:
    """PDMGraphs for a PDM on a GPU, or None (with one warning) where graphs cannot work.

    ``tp_group``: the PDM's TP group, whose ranks agree on graphs versus eager steps.
    """
    reason = why_no_graphs(module.head.weight.device, tp_size, backend)
    if reason:
        log.warning("draft.cuda_graphs: %s; the PDM runs eagerly", reason)
        return None
    graphs = PDMGraphs(module, capture=True)
    graphs.agree = agree_across(tp_group if tp_size > 1 else None, module.head.weight.device)
    return graphs
