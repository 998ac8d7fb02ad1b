"""Per-stage static KV cache with a caller-set write position and O(1) rollback."""

from __future__ import annotations

from typing import Optional

import torch

from spd_megatron.errors import SPDError


class StageKVCache:
    """Megatron's ``StaticInferenceContext`` for one stage, with an explicit length.

    The buffers ``[max_seq_len, 1, kv_groups/tp, head_dim]`` per layer are allocated on the first
    forward. Reads use ``[:length + n]`` and writes go to ``[length:length + n]``, so rolling back
    only moves ``length``: nothing is copied or cleared. Each stage owns its own cache, so stages can
    sit at different positions (as SPD needs).
    """

    def __init__(self, max_seq_len: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.max_seq_len = max_seq_len
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_seq_len)
        self.context.materialize_only_last_token_logits = False

    @property
    def length(self) -> int:
        """Positions [0, length) hold valid keys and values."""
        return self.context.sequence_len_offset

    def prepare_write(self, start: int, count: int) -> None:
        """Point the next forward at positions [start, start + count).

        Raises:
            SPDError: the write would leave a hole or overflow the cache.
        """
        if start > self.length:
            raise ValueError(f"KV write at {start} would leave a hole (cache length {self.length})")
        if start + count > self.max_seq_len:
            raise SPDError(
                f"sequence of {start + count} tokens does not fit the KV cache of "
                f"{self.max_seq_len}; raise model.max_seq_len or shorten the prompt / max_new_tokens"
            )
        self.context.sequence_len_offset = start

    def commit_write(self, start: int, count: int) -> None:
        """Record that positions [start, start + count) were written (megatron does not advance)."""
        self.context.sequence_len_offset = start + count

    def truncate(self, length: int) -> None:
        """Roll back to ``length`` positions, O(1)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.context.sequence_len_offset = length

    def layer_kv(self, layer_number: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views of the valid prefix for a 1-based global layer number, or None."""
        kv = self.context.key_value_memory_dict.get(layer_number)
        if kv is None:
            return None
        keys, values = kv[0], kv[1]
        return keys[: self.length], values[: self.length]


def causal_mask(start: int, count: int, sliding_window: Optional[int] = None,
                device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """Boolean mask (True = masked) for ``count`` queries at positions [start, start + count).

    Returns None when nothing needs masking (one query, no window), which keeps megatron on its
    fast path.

    Returns:
        [1, 1, count, start + count] bool on ``device`` (CPU by default), or None.
    """
    if count == 1 and (sliding_window is None or start + 1 <= sliding_window):
        return None
    q_pos = torch.arange(start, start + count, device=device).unsqueeze(1)  # [count, 1]
    k_pos = torch.arange(start + count, device=device).unsqueeze(0)  # [1, start + count]
    masked = k_pos > q_pos
    if sliding_window is not None:
        masked |= k_pos <= q_pos - sliding_window
    return masked.view(1, 1, count, start + count)
