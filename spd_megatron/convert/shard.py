"""Tensor-parallel slicing of the FULL megatron-core state dict, and pipeline-stage key renames.

Each rule names how one parameter is split over ``tp_size`` ranks:

- ``dim0``: contiguous row chunks (embedding, output layer, fused QKV weight and bias; the
  QKV interleave per KV group makes a row chunk exactly ``groups / tp_size`` whole groups);
- ``dim1``: contiguous column chunks (``linear_proj``, ``linear_fc2``);
- ``fc1``: per rank ``cat([gate_r, up_r])``, where gate is rows ``[0, ffn)`` and up is rows
  ``[ffn, 2 ffn)`` of the full ``linear_fc1`` (a plain row chunk would be wrong);
- ``replicated``: every norm.

``shard_for_tp`` accepts a tensor or a safetensors slice, so a rank reads only its part.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

import torch
from torch import Tensor

from spd_megatron.errors import SPDError
from spd_megatron.target.arch import ArchSpec

REPLICATED, DIM0, DIM1, FC1 = "replicated", "dim0", "dim1", "fc1"

# (module name, parameter name) -> rule; the module name is the last-but-one part of the key.
_TP_RULES = {
    ("word_embeddings", "weight"): DIM0,
    ("output_layer", "weight"): DIM0,
    ("linear_qkv", "weight"): DIM0,
    ("linear_qkv", "bias"): DIM0,
    ("linear_proj", "weight"): DIM1,
    ("linear_fc1", "weight"): FC1,
    ("linear_fc2", "weight"): DIM1,
    ("input_layernorm", "weight"): REPLICATED,
    ("pre_mlp_layernorm", "weight"): REPLICATED,
    ("q_layernorm", "weight"): REPLICATED,
    ("k_layernorm", "weight"): REPLICATED,
    ("final_layernorm", "weight"): REPLICATED,
    ("linear_qkv", "layer_norm_weight"): REPLICATED,  # Transformer Engine spec: fused input norm
    ("linear_fc1", "layer_norm_weight"): REPLICATED,  # Transformer Engine spec: fused pre-MLP norm
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")

# A torch Tensor, or a safetensors slice (``safe_open(...).get_slice(name)``).
TensorOrSlice = Union[Tensor, Any]


def tp_rule(name: str) -> str:
    """The tensor-parallel rule of a megatron parameter: ``dim0``, ``dim1``, ``fc1`` or ``replicated``.

    Args:
        name: a megatron key, e.g. ``decoder.layers.3.mlp.linear_fc1.weight`` (global or local index).

    Raises:
        SPDError: the key is not a parameter that spd_megatron knows how to shard.
    """
    parts = name.rsplit(".", 2)
    rule = _TP_RULES.get((parts[-2], parts[-1])) if len(parts) >= 2 else None
    if rule is None:
        raise SPDError(
            f"no tensor-parallel rule for parameter '{name}'; it is not a Llama-style megatron key"
        )
    return rule


def check_tp_compatible(arch: ArchSpec, tp_size: int) -> None:
    """Check that the model can be split over ``tp_size`` tensor-parallel ranks.

    Args:
        arch: the model architecture.
        tp_size: the tensor-parallel size.

    Raises:
        SPDError: ``tp_size`` is below 1 or does not divide the heads, the KV groups, the
            FFN size or the vocabulary; the message names which and the valid sizes.
    """
    if tp_size < 1:
        raise SPDError(f"tensor_parallel_size must be at least 1, got {tp_size}")
    fields = ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")
    common = math.gcd(*(getattr(arch, field) for field in fields))
    valid = ", ".join(str(n) for n in range(1, common + 1) if common % n == 0)
    for field in fields:
        value = getattr(arch, field)
        if value % tp_size:
            raise SPDError(
                f"tensor_parallel_size={tp_size} does not divide {field}={value} of this model; "
                f"pick a TP size that divides {value} (valid for this model: {valid})"
            )


def shard_for_tp(
    name: str, full: TensorOrSlice, arch: ArchSpec, tp_rank: int, tp_size: int
) -> Tensor:
    """Cut this tensor-parallel rank's part of one full megatron parameter.

    Args:
        name: the megatron key (global or local layer index).
        full: the full tensor, or a safetensors slice of it (then only this rank's part is read).
        arch: the model architecture.
        tp_rank: this rank's index in its tensor-parallel group.
        tp_size: the tensor-parallel size.

    Returns:
        A new contiguous tensor with this rank's part.

    Raises:
        SPDError: ``tp_size`` does not fit the model, or ``full`` has a shape the rule cannot split.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, {tp_size})")
    check_tp_compatible(arch, tp_size)
    rule, shape = tp_rule(name), _shape_of(full)
    if rule == REPLICATED:
        part = full[:]
    elif rule == DIM0:
        start, stop = _chunk_bounds(name, shape, 0, tp_rank, tp_size)
        part = full[start:stop]  # [rows / tp, (h)]
    elif rule == DIM1:
        start, stop = _chunk_bounds(name, shape, 1, tp_rank, tp_size)
        part = full[:, start:stop]  # [rows, cols / tp]
    else:
        part = _fc1_part(name, full, shape, arch, tp_rank, tp_size)
    return part.clone(memory_format=torch.contiguous_format)


def unshard_tp(name: str, shards: list[Tensor], arch: ArchSpec) -> Tensor:
    """Join the tensor-parallel parts of one parameter into the full tensor (inverse of ``shard_for_tp``).

    Args:
        name: the megatron key (global or local layer index).
        shards: the parts, ordered by ``tp_rank``.
        arch: the model architecture.

    Returns:
        The full tensor.

    Raises:
        SPDError: the parts of a ``linear_fc1`` do not join to ``2 * ffn_hidden_size`` rows.
    """
    rule = tp_rule(name)
    if rule == REPLICATED:
        return shards[0].clone()
    if rule in (DIM0, DIM1):
        return torch.cat(shards, dim=0 if rule == DIM0 else 1)
    halves = [shard.chunk(2, dim=0) for shard in shards]  # per rank: gate_r, up_r [ffn / tp, h]
    full = torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)  # [2 ffn, h]
    if full.shape[0] != 2 * arch.ffn_hidden_size:
        raise SPDError(
            f"parts of {name} join to {full.shape[0]} rows, expected {2 * arch.ffn_hidden_size} "
            "(2 x ffn_hidden_size) for this config"
        )
    return full


def global_to_local_key(name: str, layer_offset: int) -> str:
    """Rename ``decoder.layers.{global}.`` to the stage-local index ``global - layer_offset``.

    Keys outside the decoder layers are returned unchanged.

    Raises:
        ValueError: the layer lies before this stage (``global < layer_offset``).
    """
    return _shift_layer(name, -layer_offset)


def local_to_global_key(name: str, layer_offset: int) -> str:
    """Rename ``decoder.layers.{local}.`` to the global index ``local + layer_offset``.

    Keys outside the decoder layers are returned unchanged.
    """
    return _shift_layer(name, layer_offset)


def _shift_layer(name: str, delta: int) -> str:
    match = _LAYER_KEY.match(name)
    if match is None:
        return name
    index = int(match.group(1)) + delta
    if index < 0:
        raise ValueError(f"{name}: layer index {match.group(1)} shifted by {delta} is negative")
    return f"decoder.layers.{index}.{name[match.end():]}"


def _fc1_part(
    name: str, full: TensorOrSlice, shape: tuple[int, ...], arch: ArchSpec, tp_rank: int, tp_size: int
) -> Tensor:
    """This rank's ``cat([gate_r, up_r])`` of a full ``linear_fc1`` ``[2 ffn, h]``."""
    ffn = arch.ffn_hidden_size
    if shape[0] != 2 * ffn:
        raise SPDError(
            f"shape of {name} is {list(shape)}, expected {2 * ffn} rows (2 x ffn_hidden_size) "
            "for this config"
        )
    rows = ffn // tp_size
    gate = full[tp_rank * rows:(tp_rank + 1) * rows]  # [ffn / tp, h]
    up = full[ffn + tp_rank * rows:ffn + (tp_rank + 1) * rows]  # [ffn / tp, h]
    return torch.cat([gate, up], dim=0)  # [2 ffn / tp, h]


def _chunk_bounds(
    name: str, shape: tuple[int, ...], dim: int, tp_rank: int, tp_size: int
) -> tuple[int, int]:
    if len(shape) <= dim or shape[dim] % tp_size:
        raise SPDError(
            f"cannot split {name} of shape {list(shape)} along dim {dim} into "
            f"tensor_parallel_size={tp_size} equal parts"
        )
    size = shape[dim] // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def _shape_of(full: TensorOrSlice) -> tuple[int, ...]:
    return tuple(full.shape) if isinstance(full, Tensor) else tuple(full.get_shape())
