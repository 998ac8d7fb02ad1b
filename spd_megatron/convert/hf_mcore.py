"""HF <-> megatron-core (local spec) state dicts for Llama, Mistral, Qwen2 and Qwen3.

Both sides are FULL tensors (unsharded, TP=1) with GLOBAL 0-based layer indices; ``shard.py``
splits them per tensor-parallel rank and renames layers per pipeline stage. The fused QKV
layout is known only here (``merge_qkv`` / ``split_qkv``).

HF side: the keys of HF's saved files (``model.layers.3.self_attn.q_proj.weight``, ...), so
``lm_head.weight`` is absent when the embeddings are tied. Megatron side: always an
``output_layer.weight`` of its own, because we never share embeddings in megatron.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from spd_megatron.errors import SPDError
from spd_megatron.target.arch import ArchSpec

EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
MC_EMBED, MC_FINAL_NORM = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight"
MC_OUTPUT = "output_layer.weight"

# HF buffers that some checkpoints carry; they are recomputed from the config.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
# Megatron bookkeeping entries (TransformerEngine / fp8 state), not parameters.
_IGNORED_MC_SUFFIXES = ("_extra_state",)

# One-to-one renames inside a layer: HF suffix -> megatron suffix (no reshaping).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QK_NORM_RENAMES = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}
_MAX_LISTED_KEYS = 6

Shape = tuple[int, ...]


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, arch: ArchSpec) -> Tensor:
    """Fuse HF q/k/v projections into megatron's ``linear_qkv``, interleaved per KV group.

    The result is ``[q_g0, k_g0, v_g0, q_g1, k_g1, v_g1, ...]`` where ``q_g`` holds the
    ``heads / groups`` query heads that share KV group ``g``.

    Args:
        q: ``[heads * head_dim, hidden]`` weight or ``[heads * head_dim]`` bias.
        k: ``[groups * head_dim, ...]``, same trailing shape as ``q``.
        v: ``[groups * head_dim, ...]``, same trailing shape as ``q``.
        arch: the model architecture.

    Returns:
        ``[(heads + 2 * groups) * head_dim, ...]``.

    Raises:
        SPDError: a shape does not fit ``arch``.
    """
    heads, groups, d = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    tail = tuple(q.shape[1:])  # (hidden,) for weights, () for biases
    for label, tensor, rows in (("q", q, heads * d), ("k", k, groups * d), ("v", v, groups * d)):
        _expect_shape(f"{label} projection", tuple(tensor.shape), (rows, *tail))
    q = q.reshape(groups, heads // groups * d, *tail)  # [groups, heads_per_group * d, (h)]
    k = k.reshape(groups, d, *tail)  # [groups, d, (h)]
    v = v.reshape(groups, d, *tail)  # [groups, d, (h)]
    return torch.cat([q, k, v], dim=1).reshape(arch.qkv_rows, *tail)  # [(nq + 2 nkv) d, (h)]


def split_qkv(qkv: Tensor, arch: ArchSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Invert ``merge_qkv``: megatron's fused ``linear_qkv`` back to HF q, k, v.

    Args:
        qkv: ``[(heads + 2 * groups) * head_dim, hidden]`` weight or ``[...]`` bias.
        arch: the model architecture.

    Returns:
        ``(q, k, v)`` as ``[heads * head_dim, ...]``, ``[groups * head_dim, ...]`` and
        ``[groups * head_dim, ...]``; fresh tensors that share no storage with ``qkv``.

    Raises:
        SPDError: the shape does not fit ``arch``.
    """
    heads, groups, d = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    tail = tuple(qkv.shape[1:])
    _expect_shape("linear_qkv", tuple(qkv.shape), (arch.qkv_rows, *tail))
    q_rows = heads // groups * d
    grouped = qkv.reshape(groups, q_rows + 2 * d, *tail)  # [groups, (hpg + 2) d, (h)]
    q, k, v = grouped.split([q_rows, d, d], dim=1)
    return (
        q.reshape(heads * d, *tail).clone(),  # [nq d, (h)]
        k.reshape(groups * d, *tail).clone(),  # [nkv d, (h)]
        v.reshape(groups * d, *tail).clone(),  # [nkv d, (h)]
    )


def hf_shapes(arch: ArchSpec) -> dict[str, Shape]:
    """Every key of an HF checkpoint file for ``arch``, with its shape.

    ``lm_head.weight`` is left out when the embeddings are tied, as in HF's saved files.
    """
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes: dict[str, Shape] = {EMBED: (arch.vocab_size, h), FINAL_NORM: (h,)}
    if not arch.tie_word_embeddings:
        shapes[LM_HEAD] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_rows, h),
            p + "self_attn.k_proj.weight": (kv_rows, h),
            p + "self_attn.v_proj.weight": (kv_rows, h),
            p + "self_attn.o_proj.weight": (h, q_rows),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
        if arch.qkv_bias:
            shapes.update({p + f"self_attn.{x}_proj.bias": (r,) for x, r in
                           (("q", q_rows), ("k", kv_rows), ("v", kv_rows))})
        if arch.qk_layernorm:
            shapes.update({p + hf_suffix: (d,) for hf_suffix in _QK_NORM_RENAMES})
    return shapes


def mcore_shapes(arch: ArchSpec) -> dict[str, Shape]:
    """Every key of the full megatron-core (local spec) state dict for ``arch``, with its shape."""
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    shapes: dict[str, Shape] = {
        MC_EMBED: (arch.vocab_size, h),
        MC_FINAL_NORM: (h,),
        MC_OUTPUT: (arch.vocab_size, h),
    }
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (arch.qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, arch.num_attention_heads * d),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * ffn, h),
            p + "mlp.linear_fc2.weight": (h, ffn),
        })
        if arch.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (arch.qkv_rows,)
        if arch.qk_layernorm:
            shapes.update({p + mc_suffix: (d,) for mc_suffix in _QK_NORM_RENAMES.values()})
    return shapes


def hf_to_mcore(hf_sd: dict[str, Tensor], arch: ArchSpec) -> dict[str, Tensor]:
    """Convert an HF checkpoint to the full megatron-core state dict.

    Args:
        hf_sd: HF keys -> tensors, as in the saved files. ``lm_head.weight`` may also be
            present for a tied model (``model.state_dict()``) if it equals the embedding.
        arch: the model architecture.

    Returns:
        Megatron keys (global layer indices) -> tensors, same dtypes; ``output_layer.weight``
        is always present (a copy of the embedding when tied).

    Raises:
        SPDError: a key is missing or unexpected, or a shape does not fit ``arch``.
    """
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if arch.tie_word_embeddings and LM_HEAD in hf_sd:
        _check_tied(hf_sd, EMBED, LM_HEAD)
        hf_sd.pop(LM_HEAD)
    check_state_dict(hf_sd, hf_shapes(arch), "HF checkpoint")
    take = hf_sd.pop  # popping: no key can be used twice, leftovers are caught below
    mc_sd = {MC_EMBED: take(EMBED)}
    for i in range(arch.num_layers):
        mc_sd.update(_layer_hf_to_mcore(take, i, arch))
    mc_sd[MC_FINAL_NORM] = take(FINAL_NORM)
    # Tied: megatron gets its own copy (a clone, so the two never share storage on save).
    mc_sd[MC_OUTPUT] = mc_sd[MC_EMBED].clone() if arch.tie_word_embeddings else take(LM_HEAD)
    assert not hf_sd, f"conversion bug: HF keys left unused: {sorted(hf_sd)}"
    return mc_sd


def mcore_to_hf(mc_sd: dict[str, Tensor], arch: ArchSpec) -> dict[str, Tensor]:
    """Convert a full megatron-core state dict back to HF keys (the exact inverse of ``hf_to_mcore``).

    Args:
        mc_sd: megatron keys (global layer indices) -> tensors; ``*._extra_state`` is ignored.
            ``output_layer.weight`` may be absent when the embeddings are tied.
        arch: the model architecture.

    Returns:
        HF keys -> tensors, without ``lm_head.weight`` when tied (like HF's saved files).

    Raises:
        SPDError: a key is missing or unexpected, a shape does not fit ``arch``, or the
            config ties the embeddings but ``output_layer`` differs from the embedding.
    """
    mc_sd = {k: v for k, v in mc_sd.items() if not k.endswith(_IGNORED_MC_SUFFIXES)}
    if arch.tie_word_embeddings and MC_OUTPUT in mc_sd:
        _check_tied(mc_sd, MC_EMBED, MC_OUTPUT)
        mc_sd.pop(MC_OUTPUT)
    expected = mcore_shapes(arch)
    if arch.tie_word_embeddings:
        expected.pop(MC_OUTPUT)
    check_state_dict(mc_sd, expected, "megatron state dict")
    take = mc_sd.pop  # popping: no key can be used twice, leftovers are caught below
    hf_sd = {EMBED: take(MC_EMBED)}
    for i in range(arch.num_layers):
        hf_sd.update(_layer_mcore_to_hf(take, i, arch))
    hf_sd[FINAL_NORM] = take(MC_FINAL_NORM)
    if not arch.tie_word_embeddings:
        hf_sd[LM_HEAD] = take(MC_OUTPUT)
    assert not mc_sd, f"conversion bug: megatron keys left unused: {sorted(mc_sd)}"
    return hf_sd


def check_state_dict(sd: dict[str, Tensor], expected: dict[str, Shape], what: str) -> None:
    """Check that ``sd`` has exactly the ``expected`` keys and shapes.

    Args:
        sd: the state dict to check (tensors or anything with ``.shape``).
        expected: key -> shape.
        what: how to name ``sd`` in the error, e.g. ``"HF checkpoint"``.

    Raises:
        SPDError: one line naming the missing keys, the unexpected keys, or the first
            key whose shape differs.
    """
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        raise SPDError(
            f"{what} has unexpected keys: {_list_keys(unexpected)}; "
            "is it a checkpoint of a different model or config?"
        )
    if missing:
        raise SPDError(
            f"{what} is missing keys: {_list_keys(missing)}; "
            "is the checkpoint complete and does config.json belong to it?"
        )
    for key, shape in expected.items():
        _expect_shape(key, tuple(sd[key].shape), shape)


def _layer_hf_to_mcore(take: Callable[[str], Tensor], i: int, arch: ArchSpec) -> dict[str, Tensor]:
    src, dst = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
    out = {dst + "self_attention.linear_qkv.weight": merge_qkv(
        take(src + "q_proj.weight"), take(src + "k_proj.weight"), take(src + "v_proj.weight"), arch)}
    if arch.qkv_bias:
        out[dst + "self_attention.linear_qkv.bias"] = merge_qkv(
            take(src + "q_proj.bias"), take(src + "k_proj.bias"), take(src + "v_proj.bias"), arch)
    for hf_suffix, mc_suffix in _layer_renames(arch).items():
        out[dst + mc_suffix] = take(f"model.layers.{i}.{hf_suffix}")
    gate, up = take(f"model.layers.{i}.mlp.gate_proj.weight"), take(f"model.layers.{i}.mlp.up_proj.weight")
    out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)  # [2 ffn, h]
    return out


def _layer_mcore_to_hf(take: Callable[[str], Tensor], i: int, arch: ArchSpec) -> dict[str, Tensor]:
    src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
    out: dict[str, Tensor] = {}
    q, k, v = split_qkv(take(src + "self_attention.linear_qkv.weight"), arch)
    out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v})
    if arch.qkv_bias:
        q, k, v = split_qkv(take(src + "self_attention.linear_qkv.bias"), arch)
        out.update({dst + "self_attn.q_proj.bias": q, dst + "self_attn.k_proj.bias": k,
                    dst + "self_attn.v_proj.bias": v})
    for hf_suffix, mc_suffix in _layer_renames(arch).items():
        out[dst + hf_suffix] = take(src + mc_suffix)
    gate, up = take(src + "mlp.linear_fc1.weight").chunk(2, dim=0)  # 2 x [ffn, h]
    out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    return out


def _layer_renames(arch: ArchSpec) -> dict[str, str]:
    return {**_LAYER_RENAMES, **(_QK_NORM_RENAMES if arch.qk_layernorm else {})}


def _check_tied(sd: dict[str, Tensor], embed_key: str, head_key: str) -> None:
    embed, head = sd.get(embed_key), sd[head_key]
    if embed is not None and (embed.shape != head.shape or not torch.equal(embed, head)):
        raise SPDError(
            f"config ties the embeddings (tie_word_embeddings=true) but {head_key} differs from "
            f"{embed_key}; set tie_word_embeddings=false in config.json"
        )


def _expect_shape(key: str, shape: Shape, expected: Shape) -> None:
    if tuple(shape) != tuple(expected):
        raise SPDError(
            f"shape of {key} is {list(shape)}, expected {list(expected)} for this config"
        )


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown} (and {more} more)" if more > 0 else shown
