"""Transformer Engine attention with our explicit masks honoured (used by the TE layer spec only).

Megatron's static KV cache switches the attention mask type to ``no_mask`` as soon as the cache
offset is > 0, and TE's ``DotProductAttention`` ignores the mask tensor for ``no_mask`` and
``causal``. Our stages pass an explicit boolean mask (True = masked) whenever one is needed: a
prompt chunk after the first, a multi-token verify, a sliding window, a CUDA-graph step over the
whole static cache. ``MaskAwareTEDotProductAttention`` therefore runs TE with ``arbitrary``
whenever a mask is given; one-token steps pass no mask and keep TE's fused ``no_mask`` kernels.

Transformer Engine is imported only inside ``mask_aware_te_attention`` (never at module import).
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor


def te_mask_type(attention_mask: Optional[Tensor], attn_mask_type):
    """The mask type TE must use: ``arbitrary`` when an explicit mask is given, else unchanged.

    Args:
        attention_mask: [1, 1, q, k] bool (True = masked) or None.
        attn_mask_type: megatron's ``AttnMaskType`` for this call (causal at offset 0, else no_mask).
    """
    from megatron.core.transformer.enums import AttnMaskType

    return attn_mask_type if attention_mask is None else AttnMaskType.arbitrary


@functools.cache
def mask_aware_te_attention() -> type:
    """Megatron's ``TEDotProductAttention`` with ``te_mask_type`` applied (needs TE and CUDA)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class MaskAwareTEDotProductAttention(TEDotProductAttention):
        """TEDotProductAttention that never drops an explicit mask (see the module docstring)."""

        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            mask_type = te_mask_type(attention_mask, attn_mask_type)
            return super().forward(query, key, value, attention_mask, mask_type, *args, **kwargs)

    return MaskAwareTEDotProductAttention
