"""Transformer Engine attention with our masks expressed as TE mask types (TE layer spec only).

Megatron's static KV cache switches the attention mask type to ``no_mask`` as soon as the cache
offset is > 0, and TE's ``DotProductAttention`` ignores the mask tensor for ``no_mask`` and
``causal``. Our stages pass an explicit boolean mask (True = masked) whenever one is needed
(``kv_cache.causal_mask``): a prompt chunk after the first, a multi-token verify, a sliding window.
That mask is always queries [s, s + n) against keys [0, s + n), optionally limited to the last
``w`` keys, which is TE's ``causal_bottom_right`` with ``window_size = (w - 1, 0)`` (TE: query i
sees keys [i + sk - sq - left, i + sk - sq + right]). Every TE backend (flash, cuDNN fused,
unfused) supports that; an ``arbitrary`` mask would force TE's unfused attention (the whole score
matrix in fp32, O(n^2) memory for a long prompt). So ``MaskAwareTEDotProductAttention`` drops the
tensor and passes the mask type and window instead (``te_mask_choice``).

The one exception is a CUDA-graph step over the whole static cache (``target/cuda_graphs.py``):
keys after the query's position exist in the buffer but are masked, which no causal type says.
Its attention returns ``arbitrary`` and keeps the mask; with one query row the unfused path costs
O(max_seq_len) per step. GQA needs no key/value repeat here: TE takes ``num_gqa_groups``.

Transformer Engine is imported only inside ``mask_aware_te_attention`` (never at module import).
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor

NO_WINDOW, CAUSAL_WINDOW = (-1, -1), (-1, 0)  # TE's window_size for no window (non-causal/causal)


def te_mask_choice(has_mask: bool, attn_mask_type, sliding_window: Optional[int] = None):
    """(mask type, TE window_size, whether TE needs the mask tensor) for one attention call.

    Args:
        has_mask: an explicit mask came with the call (``causal_mask``, or a graph step's).
        attn_mask_type: megatron's ``AttnMaskType`` for this call: causal at offset 0, no_mask
            after, arbitrary from a CUDA-graph step over the static cache.
        sliding_window: the model's window ``w`` (a query sees itself and the ``w - 1`` keys
            before it), or None.
    """
    from megatron.core.transformer.enums import AttnMaskType

    causal_window = CAUSAL_WINDOW if sliding_window is None else (sliding_window - 1, 0)
    if has_mask and attn_mask_type == AttnMaskType.arbitrary:  # graph step: keys past the query exist
        return AttnMaskType.arbitrary, NO_WINDOW, True
    if has_mask:  # causal_mask: queries [s, s + n) against keys [0, s + n)
        return AttnMaskType.causal_bottom_right, causal_window, False
    if attn_mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
        return attn_mask_type, causal_window, False
    return attn_mask_type, NO_WINDOW, False  # one query, nothing to mask


@functools.cache
def mask_aware_te_attention() -> type:
    """Megatron's ``TEDotProductAttention`` with ``te_mask_choice`` applied (needs TE and CUDA)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class MaskAwareTEDotProductAttention(TEDotProductAttention):
        """TEDotProductAttention that turns our masks into TE mask types (see the module docstring).

        ``sliding_window`` is set after the model is built (``set_sliding_window``).
        """

        sliding_window: Optional[int] = None

        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            mask_type, window, keep = te_mask_choice(attention_mask is not None, attn_mask_type,
                                                     self.sliding_window)
            self.window_size = window  # TE's default for this call (megatron passes none)
            return super().forward(query, key, value, attention_mask if keep else None, mask_type,
                                   *args, **kwargs)

    return MaskAwareTEDotProductAttention


def set_sliding_window(model, sliding_window: Optional[int]) -> int:
    """Tell every mask-aware TE attention of ``model`` the window; returns how many were set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "sliding_window") and type(module).__name__ == "MaskAwareTEDotProductAttention":
            module.sliding_window = sliding_window
            count += 1
    return count
