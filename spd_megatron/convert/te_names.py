"""Parameter names of Megatron's Transformer Engine layer spec vs the local spec (pure; no TE import).

Our checkpoints store local-spec names. The TE spec fuses each pre-norm into the linear layer
that follows it and adds ``_extra_state`` (TE's FP8 metadata) to every TE module:

=====================================================  ============================================
local spec (checkpoint)                                TE spec (model)
=====================================================  ============================================
``decoder.layers.i.input_layernorm.weight``            ``decoder.layers.i.self_attention.linear_qkv.layer_norm_weight``
``decoder.layers.i.pre_mlp_layernorm.weight``          ``decoder.layers.i.mlp.linear_fc1.layer_norm_weight``
(none)                                                 ``...._extra_state``
=====================================================  ============================================

Everything else (fused QKV, ``linear_proj``, ``linear_fc1/fc2``, q/k norms, embedding, final norm,
output layer) has the same name in both specs. The maps work in both directions, so a checkpoint
written with either naming loads into a model built with either spec.
"""

from __future__ import annotations

from typing import Iterable, Optional

# local suffix (after ``decoder.layers.i.``) <-> TE suffix
LOCAL_TO_TE_SUFFIX = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TE_TO_LOCAL_SUFFIX = {te: local for local, te in LOCAL_TO_TE_SUFFIX.items()}
EXTRA_STATE = "_extra_state"


def is_extra_state(name: str) -> bool:
    """TE's per-module FP8 metadata: never stored in, nor loaded from, a checkpoint."""
    return name.endswith(EXTRA_STATE)


def uses_te_names(keys: Iterable[str]) -> bool:
    """True when a key list (a model's state dict or a checkpoint) has TE's fused-norm names."""
    return any(_swap_suffix(k, TE_TO_LOCAL_SUFFIX) is not None for k in keys)


def te_to_local(name: str) -> Optional[str]:
    """The local-spec name of a TE-spec key; None for ``_extra_state`` (no checkpoint tensor).

    Keys that are the same in both specs are returned unchanged.
    """
    if is_extra_state(name):
        return None
    return _swap_suffix(name, TE_TO_LOCAL_SUFFIX) or name


def local_to_te(name: str) -> str:
    """The TE-spec name of a local-spec key (unchanged when both specs agree)."""
    return _swap_suffix(name, LOCAL_TO_TE_SUFFIX) or name


def checkpoint_key_for(model_key: str, available: Iterable[str] | set[str]) -> Optional[str]:
    """Which checkpoint tensor fills ``model_key``: its own name, else the other spec's name.

    Args:
        model_key: a key of the model's state dict (either spec, any layer index).
        available: the checkpoint's keys (a set is fastest).

    Returns:
        The checkpoint key, or None when the model key has no checkpoint tensor (``_extra_state``)
        or neither name is in the checkpoint.
    """
    if is_extra_state(model_key):
        return None
    available = available if isinstance(available, (set, frozenset, dict)) else set(available)
    for candidate in (model_key, te_to_local(model_key), local_to_te(model_key)):
        if candidate in available:
            return candidate
    return None


def normalize_to_local(state: dict) -> dict:
    """A state dict with TE names renamed to local names and ``_extra_state`` dropped."""
    return {te_to_local(k): v for k, v in state.items() if not is_extra_state(k)}


def _swap_suffix(name: str, table: dict[str, str]) -> Optional[str]:
    for old, new in table.items():
        if name.endswith("." + old) and name.startswith("decoder.layers."):
            return name[: -len(old)] + new
    return None
