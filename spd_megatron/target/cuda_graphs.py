"""CUDA graphs for a stage's one-token decode step (``model.cuda_graphs=true``).

Why not megatron's own inference graphs: with a ``StaticInferenceContext`` megatron writes and
reads the KV cache with Python-int slices (``memory[offset:offset + 1]``, ``memory[:offset + 1]``,
``rope[offset:offset + 1]``), so a captured graph would replay the write position and key length
it was captured with. Megatron's way round this (``cuda_graph_impl="local"``) requires
``flash_decode``, i.e. the flash-attn package, and its own inference engine.

What we do instead, for any layer spec:

- ``StaticPositionSelfAttention`` (put into the layer spec by ``static_decode_spec``): when the
  context carries ``static_position`` (a [1] int64 tensor on the GPU), the new key/value row is
  written with ``index_copy_`` at that position, attention runs over the whole static cache
  ``[max_seq_len]`` and RoPE rows are picked with ``index_select``. Nothing depends on a Python
  int, so ONE captured graph serves every position. Without ``static_position`` megatron's code
  runs unchanged (prefill chunks, multi-token steps, CPU).
- ``static_decode_mask`` masks the keys after the position (and outside a sliding window);
  the cache rows beyond the prefix are zeroed once, so masked rows contribute exactly 0.
- ``DecodeGraphs`` owns the static buffers (position, token id or hidden state), captures one
  graph per set of anchor taps, replays it, and copies the output (and taps) out of the graph's
  memory. The step is checked against the eager static step at capture. Any failure (capture,
  check) logs one warning and the stage decodes eagerly from then on. The TP ranks of a stage
  agree on that choice (``agree_across``: an all-reduce of a success flag after the capture and
  after the check), so no rank replays graphs with captured all-reduces that a peer, decoding
  eagerly, would never join.

The static step itself runs on CPU too (``DecodeGraphs(stage, capture=False)``), which is how the
CPU tests check it against the ordinary step; only the capture needs a GPU. Not captured: FP8
(current scaling keeps no host state, but FP8 under capture is unverified: config refuses it), and
TP > 1 over gloo (collectives inside a graph need NCCL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before capture (allocator and library warm-up)


class StaticPositionSelfAttention(SelfAttention):
    """SelfAttention whose KV-cache update can take its write position as a device tensor.

    Keys are cached after RoPE (megatron's static path caches them before and rotates the whole
    prefix again on every forward; over the static cache of a graph step that would be all
    ``max_seq_len`` rows per layer per token). Each forward rotates only its own new keys, eager
    or static, so both paths keep the same cache.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        *args, **kwargs):
        position = getattr(inference_context, "static_position", None)
        if rotary_pos_emb is not None:
            rows = position if position is not None else torch.arange(
                inference_context.sequence_len_offset, inference_context.sequence_len_offset + key.shape[0],
                device=key.device)  # [n] positions of the new keys
            key = self._rotate(key, rotary_pos_emb[1].index_select(0, rows))
        if position is None:
            query, key, value, rope, mask_type, table = super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
            return query, key, value, None if rope is None else (rope[0], None), mask_type, table
        return static_kv_update(inference_context.key_value_memory_dict[self.layer_number],
                                position, query, key, value, rotary_pos_emb, keys_rotated=True)

    def _rotate(self, key: Tensor, freqs: Tensor) -> Tensor:
        """RoPE on [n, 1, groups, d] keys with their own [n, 1, 1, d] rows (as megatron does it)."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

        return apply_rotary_pos_emb(key, freqs, config=self.config,
                                    mscale=_yarn_get_concentration_factor_from_config(self.config),
                                    cp_group=self.pg_collection.cp)


def static_kv_update(memory: tuple[Tensor, Tensor], position: Tensor, query: Tensor, key: Tensor,
                     value: Tensor, rotary_pos_emb, keys_rotated: bool = False):
    """Write R tokens' keys/values at ``position`` and return the whole static cache.

    Args:
        memory: (K, V) of this layer, [Smax, 1, groups, d] each (allocated by the prefill).
        position: [R] int64 on the cache's device (R = 1 for a stage step, R rows for the PDM).
        query, key, value: [R, 1, heads or groups, d] of the new tokens (keys before RoPE).
        rotary_pos_emb: (q, k) RoPE tables [Smax, 1, 1, d], or None.
        keys_rotated: ``key`` already carries RoPE (cached rotated): no k table is returned, so
            megatron does not rotate the whole cache again.

    Returns:
        What megatron's ``_adjust_key_value_for_inference`` returns: query, K [Smax...], V,
        (q RoPE rows [R, 1, 1, d], k RoPE [Smax, ...]), the mask type (arbitrary), no block table.
    """
    from megatron.core.transformer.enums import AttnMaskType

    keys, values = memory
    keys.index_copy_(0, position, key)
    values.index_copy_(0, position, value)
    if rotary_pos_emb is not None:
        q_emb, k_emb = rotary_pos_emb
        rotary_pos_emb = (q_emb.index_select(0, position), None if keys_rotated else k_emb[: keys.shape[0]])
    return query, keys, values, rotary_pos_emb, AttnMaskType.arbitrary, None


def static_decode_spec(spec):
    """A copy of a GPT layer spec whose self-attention is ``StaticPositionSelfAttention``."""
    import copy

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.module = StaticPositionSelfAttention
    return spec


def static_decode_mask(key_positions: Tensor, position: Tensor,
                       sliding_window: Optional[int] = None) -> Tensor:
    """True = masked: keys after each query's position (and outside the window).

    [Smax] keys, [R] query positions -> [1, 1, R, Smax].
    """
    queries = position.view(-1, 1)  # [R, 1]
    masked = key_positions.view(1, -1) > queries  # [R, Smax]
    if sliding_window is not None:
        masked = masked | (key_positions.view(1, -1) <= queries - sliding_window)
    return masked.view(1, 1, *masked.shape)


@dataclass
class CapturedStep:
    """One captured graph: its output and tap tensors live in the graph's memory pool."""

    graph: object
    out: Tensor
    taps: dict[int, Tensor] = field(default_factory=dict)


class DecodeGraphs:
    """A stage's one-token steps at a static shape, replayed as CUDA graphs.

    Args:
        stage: a TargetStage whose model was built with ``static_decode_spec``.
        capture: True (CUDA): capture once per tap set, then replay. False: run the static-shape
            step eagerly (CPU tests).
        agree: ``agree(ok) -> all ok`` across the stage's TP ranks (``agree_across``); default:
            this rank alone.
    """

    def __init__(self, stage, capture: bool = True, agree=None) -> None:
        self.stage, self.capture = stage, capture
        self.agree = agree or alone
        device, arch = stage.device, stage.arch
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # [1]
        self.key_positions = torch.arange(stage.cache.max_seq_len, device=device)  # [Smax]
        if stage.placement.is_first:
            self.inp = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] token id
        else:
            dtype = next(stage.model.parameters()).dtype
            self.inp = torch.zeros(1, 1, arch.hidden_size, dtype=dtype, device=device)  # [1, 1, h]
        self.graphs: dict[tuple[int, ...], CapturedStep] = {}
        self.pool = None
        self.disabled: Optional[str] = None
        self._cache_zeroed = False

    def step(self, start: int, token_ids: Optional[Tensor], hidden: Optional[Tensor]) -> Optional[Tensor]:
        """One token at ``start``; returns [1, 1, h] or [1, 1, V], or None to run it eagerly."""
        cache = self.stage.cache
        if self.disabled or not cache.context.key_value_memory_dict:
            return None  # the first forward (a prefill) allocates the cache eagerly
        cache.prepare_write(start, 1)
        self._zero_cache_tail()
        self.position.fill_(start)
        self.inp.copy_(token_ids if self.stage.placement.is_first else hidden)
        out = self._static_forward() if not self.capture else self._replay()
        if out is not None:
            cache.commit_write(start, 1)
        return out

    def disable(self, reason: str) -> None:
        """Fall back to eager steps for good, with one warning."""
        self.disabled = reason
        self.graphs.clear()
        log.warning("model.cuda_graphs: %s; this stage decodes eagerly", reason)

    # ---- the static-shape step (eager or under capture) ---------------------------------------
    def _static_forward(self) -> Tensor:
        stage = self.stage
        context = stage.cache.context
        mask = static_decode_mask(self.key_positions, self.position, stage.arch.sliding_window)
        first = stage.placement.is_first
        if not first:
            stage.model.set_input_tensor(self.inp)
        context.static_position = self.position
        try:
            return stage.model(self.inp if first else stage._dummy_ids, None, mask,
                               inference_context=context, runtime_gather_output=True)
        finally:
            context.static_position = None

    def _zero_cache_tail(self) -> None:
        if not self._cache_zeroed:
            zero_cache_tail(self.stage.cache)
            self._cache_zeroed = True

    # ---- capture and replay ---------------------------------------------------------------------
    def _replay(self) -> Optional[Tensor]:
        key = self.stage.tap_indices
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self._capture()
            except Exception as err:  # noqa: BLE001 - any failure: decode eagerly instead
                self.disable(f"capture failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
                return None
            self.graphs[key] = captured
        captured.graph.replay()
        self.stage.taps = {k: t.clone() for k, t in captured.taps.items()}
        return captured.out.clone()  # the next replay overwrites the graph's own output

    def _capture(self) -> CapturedStep:
        """Capture the static step (``capture_checked``); the taps it wrote live in the graph."""
        graph, out = capture_checked(self._static_forward, self.pool, self.agree)
        self.pool = graph.pool()
        return CapturedStep(graph, out, dict(self.stage.taps))


def capture_checked(step, pool=None, agree=None) -> tuple:
    """Warm ``step`` up on a side stream, capture it, replay once and compare with the eager run.

    ``step()`` must be idempotent given its static inputs: the warm-up runs and the check replay
    write the same key/value rows as the real step (same input, same position), so they leave a
    cache as the step itself would. ``agree(ok)`` (default: this rank alone) tells every TP rank
    whether all captured, before the check replay runs the captured collectives, and whether all
    replays matched: every rank then keeps its graph, or every rank raises. (The warm-up is an
    ordinary eager step: where it fails, eager decoding fails too.)

    Returns (graph, output tensor in the graph's memory).
    """
    agree = agree or alone
    graph, out, eager = agreed(lambda: _capture_graph(step, pool), agree, "capture")
    graph.replay()
    agreed(lambda: check_replay(out, eager), agree, "replay check")
    return graph, out


def _capture_graph(step, pool) -> tuple:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    eager = eager.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = step()
    return graph, out, eager


def agreed(fn, agree, what: str):
    """``fn()``'s result when it succeeded on every rank ``agree`` asks; else raise (on every rank)."""
    try:
        result, error = fn(), None
    except Exception as err:  # noqa: BLE001 - reported to the peers first, then raised
        result, error = None, err
    if not agree(error is None):
        raise error or RuntimeError(f"{what} failed on a tensor-parallel peer")
    return result


def alone(ok: bool) -> bool:
    return ok


def agree_across(group, device: torch.device):
    """``agree(ok)``: True when ``ok`` on every rank of ``group`` (one all-reduce MIN of a flag)."""
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return alone

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)  # [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    return agree


def zero_cache_tail(cache) -> None:
    """Rows never written hold torch.empty garbage (maybe NaN); masked rows must be finite."""
    length = cache.length
    for keys, values in cache.context.key_value_memory_dict.values():
        keys[length:].zero_()
        values[length:].zero_()


def check_replay(replayed: Tensor, eager: Tensor, rel: float = 1e-3) -> None:
    """Raise when a replay differs from the eager step by more than ``rel`` of its scale."""
    diff = float((replayed.float() - eager.float()).abs().max())
    scale = max(1.0, float(eager.float().abs().max()))
    if not diff <= rel * scale:  # also catches NaN
        raise RuntimeError(f"graph replay differs from the eager step by {diff:.3g}")


def why_no_graphs(device: torch.device, tp_size: int, backend: str) -> Optional[str]:
    """Why CUDA graphs cannot work for a module on ``device``, or None when they can."""
    if device.type != "cuda":
        return f"it is on {device}, not a GPU"
    if tp_size > 1 and backend != "nccl":
        return f"TP={tp_size} collectives inside a graph need NCCL (backend is {backend})"
    return None


def make_decode_graphs(stage, tp_size: int, backend: str, tp_group=None) -> Optional[DecodeGraphs]:
    """DecodeGraphs for a CUDA stage, or None (with one warning) where graphs cannot work.

    ``tp_group``: the stage's TP group, whose ranks agree on graphs versus eager steps.
    """
    reason = why_no_graphs(stage.device, tp_size, backend)
    if reason:
        log.warning("model.cuda_graphs: %s; the stage decodes eagerly", reason)
        return None
    return DecodeGraphs(stage, capture=True, agree=agree_across(tp_group, stage.device))
