"""Megatron ModuleSpec choice: the local spec (CPU, reference) or Transformer Engine (GPU, FP8)."""

from __future__ import annotations

import functools
import logging

import torch

from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)


@functools.cache
def transformer_engine_available() -> bool:
    """True when CUDA exists and Transformer Engine imports.

    A half-installed TE raises RuntimeError (not ImportError) at import, so every exception is caught.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken TE must not crash the run
        log.warning("Transformer Engine unavailable (%s); using the local layer spec", err)
        return False
    return True


def resolve_layer_spec_name(requested: str) -> str:
    """Map model.layer_spec (auto | lean | local | transformer_engine) to the spec that will be built.

    auto: Transformer Engine where it imports (GPU), else the lean spec (``target/lean.py``).
    """
    if requested == "auto":
        return "transformer_engine" if transformer_engine_available() else "lean"
    if requested == "transformer_engine" and not transformer_engine_available():
        raise SPDError(
            "model.layer_spec=transformer_engine needs a CUDA GPU with Transformer Engine installed; "
            "use model.layer_spec=local (or auto)"
        )
    return requested


def build_layer_spec(name: str, qk_layernorm: bool, static_decode: bool = False):
    """The decoder-layer ModuleSpec for a resolved spec name.

    ``lean``: Megatron's local modules with short inference forwards (``target/lean.py``); its
    attention takes ``static_position`` itself, so ``static_decode`` changes nothing there.
    The TE spec's core attention is swapped for ``MaskAwareTEDotProductAttention`` (our explicit
    masks must reach TE). ``static_decode`` swaps in the self-attention that CUDA graphs need
    (``target/cuda_graphs.py``); it changes nothing until a graph step asks for it.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if name == "lean":
        from spd_megatron.target.lean import lean_layer_spec

        return lean_layer_spec(qk_layernorm)
    if name == "transformer_engine":
        from spd_megatron.target.te_attention import mask_aware_te_attention

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        spec.submodules.self_attention.submodules.core_attention = mask_aware_te_attention()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    if static_decode:
        from spd_megatron.target.cuda_graphs import static_decode_spec

        spec = static_decode_spec(spec)
    return spec
