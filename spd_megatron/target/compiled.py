"""``model.compile``: a stage's (and the PDM's) static-shape steps through ``torch.compile`` (inductor).

The step is the lean spec's static-position path (``target/lean.py``): the positions are a [R]
int64 tensor, new keys/values go into the static KV cache with ``index_copy_``, attention spans
the whole cache under a mask computed from the positions. Nothing depends on a Python int, so one
compiled graph per row count R serves every position: the one-token step, the prefill chunk and
the PDM's R = 1..n+1 rows. Shapes are static (``dynamic=False``); every R is compiled once when
the steps are built (``warm_up``), so a decode never compiles. Inductor's FX-graph cache lives
under the model cache (``<cache>/inductor``), so a second process with the same model reuses the
compiled kernels. Any failure (tracing, compiling, running) logs one warning and the module runs
eagerly from then on.

Only TP = 1 and the lean spec: a compiled graph would have to carry megatron's TP collectives, and
the local spec's attention has no static-position path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_megatron.target.lean import LeanSelfAttention, RopeCosSin, rope_tables

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs per step function: row counts x tap sets, all compiled at warm-up


def static_mask(key_positions: Tensor, position: Tensor, sliding_window: Optional[int]) -> Tensor:
    """True = masked: keys after each query's position (and outside the window). -> [1, 1, R, Smax]."""
    queries = position.view(-1, 1)  # [R, 1]
    masked = key_positions.view(1, -1) > queries  # [R, Smax]
    if sliding_window is not None:
        masked = masked | (key_positions.view(1, -1) <= queries - sliding_window)
    return masked.view(1, 1, *masked.shape)


def static_step(model, inp: Tensor, position: Tensor, key_positions: Tensor, rope: RopeCosSin,
                context, tap_layers: tuple[int, ...], sliding_window: Optional[int]):
    """One static-shape forward of a GPTModel stage at TP = 1 (what gets compiled).

    Args:
        model: the stage's GPTModel (lean spec); ``model.embedding`` / ``model.output_layer`` are
            used when present (first / last stage).
        inp: [1, R] token ids (first stage) or [R, 1, h] hidden states.
        position: [R] int64 positions; ``context.static_position`` must be this tensor.
        key_positions: [Smax] arange of the cache rows.
        rope: the whole cos / signed-sin tables [Smax, 1, 1, d].
        tap_layers: global hidden-state indices k to return (0 = the embedding output).

    Returns:
        (hidden [R, 1, h] or logits [1, R, V], {k: [R, 1, h]}).
    """
    mask = static_mask(key_positions, position, sliding_window)
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        hidden = F.embedding(inp, embedding.word_embeddings.weight).transpose(0, 1)  # [R, 1, h]
    else:
        hidden = inp
    taps = {0: hidden} if 0 in tap_layers else {}
    for layer in model.decoder.layers:  # .forward: no hooks (taps are returned instead)
        hidden, _ = layer.forward(hidden, mask, rotary_pos_emb=rope, inference_context=context)
        if layer.layer_number in tap_layers:
            taps[layer.layer_number] = hidden
    if getattr(model, "post_process", False):
        hidden = model.decoder.final_layernorm(hidden)
        hidden = F.linear(hidden, model.output_layer.weight).transpose(0, 1).contiguous()  # [1, R, V]
    return hidden, taps


def allocate_cache(model, context) -> None:
    """The static KV buffers [Smax, b, groups, head_dim] of every layer (zeros), before compiling."""
    memory = context.key_value_memory_dict
    dtype = next(model.parameters()).dtype
    for layer in model.decoder.layers:
        attn = layer.self_attention
        if attn.layer_number not in memory:
            shape = (context.max_sequence_length, context.max_batch_size,
                     attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head)
            device = attn.linear_qkv.weight.device
            memory[attn.layer_number] = (torch.zeros(shape, dtype=dtype, device=device),
                                         torch.zeros(shape, dtype=dtype, device=device))


def why_not_compiled(model, tp_size: int) -> Optional[str]:
    """Why ``model`` cannot take the compiled step, or None when it can."""
    if tp_size > 1:
        return f"TP={tp_size} (compiled steps run at TP=1 only)"
    if not any(isinstance(m, LeanSelfAttention) for m in model.modules()):
        return "the layer spec is not lean (model.layer_spec=lean)"
    return None


def inductor_cache_dir(cache_root: str | Path) -> Path:
    """Point inductor's on-disk caches (FX graphs, kernels) at ``<cache_root>/inductor``."""
    path = Path(cache_root) / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor whenever it compiles
    return path


class CompiledSteps:
    """Static-shape steps of one GPTModel over its ``StageKVCache``, compiled once per row count.

    Args:
        model: a lean-spec GPTModel at TP = 1.
        cache: its ``StageKVCache`` (the buffers must exist: ``warm_up`` allocates them).
        row_counts: the R that take the compiled step; other counts return None (run eagerly).
        sliding_window: the architecture's window, or None.
        backend: ``torch.compile`` backend ("inductor"; tests use "eager" / a failing one).
    """

    def __init__(self, model, cache, row_counts: Iterable[int], sliding_window: Optional[int] = None,
                 backend: str | Callable = "inductor") -> None:
        self.model, self.cache, self.sliding_window = model, cache, sliding_window
        self.row_counts = tuple(sorted(set(row_counts)))
        device = next(model.parameters()).device
        self.key_positions = torch.arange(cache.max_seq_len, device=device)  # [Smax]
        self.rope = None
        self.compile_seconds = 0.0
        self.disabled: Optional[str] = None
        self._compiled = {}  # row count -> set of tap tuples already compiled
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        self.fn = torch.compile(static_step, backend=backend, dynamic=False)

    def run(self, inp: Tensor, start: int, tap_layers: tuple[int, ...] = ()) -> Optional[tuple]:
        """Rows at positions [start, start + R) through the compiled step, extending the cache.

        Returns:
            (output, taps) as ``static_step`` returns them, or None: not a compiled row count, the
            steps are disabled, or this call failed (then they are disabled, with one warning).
        """
        count = inp.shape[1] if inp.dtype == torch.long else inp.shape[0]
        if self.disabled or count not in self.row_counts:
            return None
        self.cache.prepare_write(start, count)
        inp = inp.clone(memory_format=torch.contiguous_format)  # a prompt chunk is a strided slice: guards
        position = torch.arange(start, start + count, device=self.key_positions.device)  # [R]
        try:
            out = self._call(inp, position, tap_layers)
        except Exception as err:  # noqa: BLE001 - any failure: eager from now on
            self.disable(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            return None
        self.cache.commit_write(start, count)
        return out

    def _call(self, inp: Tensor, position: Tensor, tap_layers: tuple[int, ...]):
        context = self.cache.context
        if self.rope is None:
            table = self.model.rotary_pos_emb(self.cache.max_seq_len)  # [Smax, 1, 1, d] angles
            self.rope = RopeCosSin(*(t.clone() for t in rope_tables(table)))
        is_new = tap_layers not in self._compiled.setdefault(position.shape[0], set())
        begin = time.perf_counter()
        context.static_position = position
        try:
            out = self.fn(self.model, inp, position, self.key_positions, self.rope, context, tap_layers,
                          self.sliding_window)
        finally:
            context.static_position = None
        if is_new:
            self._compiled[position.shape[0]].add(tap_layers)
            self.compile_seconds += time.perf_counter() - begin
        return out

    def warm_up(self, make_input: Callable[[int], Tensor], tap_layers: tuple[int, ...] = ()) -> None:
        """Compile every row count now, on an empty cache (scratch rows at [0, R), then truncated).

        Raises:
            ValueError: the cache holds positions (the scratch rows would overwrite them).
        """
        if self.cache.length:
            raise ValueError(f"warm_up needs an empty cache (it holds {self.cache.length} positions)")
        begin = time.perf_counter()
        with torch.inference_mode():  # as decoding runs: grad mode is part of every graph's guards
            allocate_cache(self.model, self.cache.context)
            for count in self.row_counts:
                if not self.disabled:
                    self.run(make_input(count), 0, tap_layers)
                    self.cache.truncate(0)
        log.info("model.compile: %d row counts compiled in %.1f s", len(self.row_counts),
                 time.perf_counter() - begin)

    def disable(self, reason: str) -> None:
        """Fall back to eager steps for good, with one warning."""
        self.disabled = reason
        log.warning("model.compile: the compiled step failed (%s); running eagerly", reason)


def resolve_compile(mode: str) -> bool:
    """model.compile -> whether to compile. ``auto`` is off: on the 2-core CPU the compiled step did
    not pay for its compile time over a 128-token decode (docs/benchmarks.md, issue 13), and GPUs
    have CUDA graphs (model.cuda_graphs) for the same static step."""
    return mode == "on"


def enable_compiled_step(cfg, ctx, stage, backend: str | Callable = "inductor") -> None:
    """``stage.compiled`` for model.compile=on: the one-token step and the prefill chunk, compiled now."""
    if not resolve_compile(cfg.model.compile):
        return
    reason = why_not_compiled(stage.model, ctx.tp_size)
    if reason:
        log.warning("model.compile: %s; the stage runs eagerly", reason)
        return
    from spd_megatron.convert.builtin import cache_root

    inductor_cache_dir(cache_root(cfg.model.cache_dir))
    rows = {1} | ({cfg.schedule.prefill_chunk_size} if cfg.schedule.prefill_chunk_size > 0 else set())
    stage.compiled = CompiledSteps(stage.model, stage.cache, rows, stage.arch.sliding_window, backend)
    stage.warm_up_compiled()


class CompiledPDMStep:
    """The PDM's layers on the cycle's R = 1..n+1 rows through ``CompiledSteps``; the head eagerly.

    Same call as ``draft.cuda_graphs.PDMGraphs``: ``step(rows [R, 1, h], start)`` -> draft-vocabulary
    logits [V_d] of the last row, or None (run eagerly).
    """

    def __init__(self, module, backend: str | Callable = "inductor") -> None:
        self.module = module
        rows = range(1, module.cfg.num_stages + 2)
        self.steps = CompiledSteps(module.layers, module.cache, rows, None, backend)
        dtype, h = module.head.weight.dtype, module.arch.hidden_size
        device = module.head.weight.device
        self.steps.warm_up(lambda count: torch.zeros(count, 1, h, dtype=dtype, device=device))

    def step(self, rows: Tensor, start: int) -> Optional[Tensor]:
        result = self.steps.run(rows, start)
        if result is None:
            return None
        return self.module.logits(result[0][-1, 0]).float()  # [V_d]


def compiled_pdm_step(cfg, module, tp_size: int) -> Optional[CompiledPDMStep]:
    """A ``CompiledPDMStep`` for model.compile=on (the PDM follows the target's setting), else None."""
    if not resolve_compile(cfg.model.compile):
        return None
    reason = why_not_compiled(module.layers, tp_size)
    if reason:
        log.warning("model.compile: %s; the PDM runs eagerly", reason)
        return None
    from spd_megatron.convert.builtin import cache_root

    inductor_cache_dir(cache_root(cfg.model.cache_dir))
    return CompiledPDMStep(module)
