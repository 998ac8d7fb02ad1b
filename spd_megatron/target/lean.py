"""The lean layer spec (``model.layer_spec=lean``): Megatron's modules with short inference forwards.

Megatron's local spec costs about 18 Python module calls, an ``autograd.Function`` and two
TP-region functions per linear, an unfused RoPE (``cos``/``sin`` of the table on every call) and a
GQA ``repeat_interleave`` per layer and token. The classes here subclass Megatron's own
(``ColumnParallelLinear``, ``RowParallelLinear``, ``SelfAttention``, ``TransformerLayer``):
their constructors, parameters, initialisation and state-dict names are unchanged, so checkpoints
load as before; only ``forward`` is replaced, and it is put in through the ``ModuleSpec``.

- Linears: ``F.linear`` on the same parameters when the TP group has one rank; with TP > 1 they
  run Megatron's forward (its collectives and autograd functions).
- Core attention: ``F.scaled_dot_product_attention`` with native GQA (``enable_gqa``).
- RoPE: ``x * cos + halves_swapped(x) * signed_sin`` with the tables computed once per RoPE table.
- KV cache: megatron's ``StaticInferenceContext`` buffers (same dict, same shapes), but keys are
  cached after RoPE, so a step ropes only its own rows. A context carrying ``static_position`` (a
  [R] int64 tensor; CUDA-graph and compiled steps) writes with ``index_copy_`` and attends over the
  whole static cache under the caller's mask; nothing then depends on a Python int.
- Norms: torch's ``RMSNorm`` (``F.rms_norm``), as in the local spec.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from spd_megatron.target.kv_cache import causal_mask


# ---- linears ------------------------------------------------------------------------------------
def _is_single_rank(linear) -> bool:
    from megatron.core.utils import get_pg_size

    return get_pg_size(linear.tp_group) == 1


class LeanColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear; at TP = 1 a plain ``F.linear`` (no autograd/TP-region wrappers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.is_plain = _is_single_rank(self) and not self.sequence_parallel

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
        if not self.is_plain or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


class LeanRowParallelLinear(RowParallelLinear):
    """RowParallelLinear; at TP = 1 a plain ``F.linear`` (no autograd/TP-region wrappers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.is_plain = _is_single_rank(self) and not self.sequence_parallel

    def forward(self, input_: Tensor):
        if not self.is_plain:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


# ---- RoPE ---------------------------------------------------------------------------------------
class RopeTables:
    """cos and signed sin of megatron RoPE tables ([S, 1, 1, d] angles), computed once per table.

    Megatron's ``RotaryEmbedding`` returns the same (lru-cached) tensor on every step, so a few
    slots keyed on the table's identity serve every layer and step of a stage and of a PDM that
    runs beside it; the oldest slot makes room for a new table.
    """

    SLOTS = 4

    def __init__(self) -> None:
        self._slots: list[tuple[Tensor, tuple[Tensor, Tensor]]] = []

    def get(self, table: Tensor) -> tuple[Tensor, Tensor]:
        for known, tables in self._slots:
            if known is table:
                return tables
        half = table.shape[-1] // 2
        sin = torch.sin(table)
        tables = (torch.cos(table), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))  # [S, 1, 1, d]
        self._slots = [(table, tables)] + self._slots[: self.SLOTS - 1]
        return tables


ROPE_TABLES = RopeTables()


class RopeCosSin(NamedTuple):
    """Precomputed RoPE rows (what ``RopeTables.get`` returns), passed as ``rotary_pos_emb``."""

    cos: Tensor  # [S, 1, 1, d]
    signed_sin: Tensor  # [S, 1, 1, d]


def rope_tables(rotary_pos_emb) -> tuple[Tensor, Tensor] | None:
    """(cos, signed sin) tables from megatron's angle table (or its (q, k) pair), or as given."""
    if rotary_pos_emb is None or isinstance(rotary_pos_emb, RopeCosSin):
        return rotary_pos_emb
    return ROPE_TABLES.get(rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Megatron's non-interleaved RoPE: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s].

    x [s, b, heads, d]; cos, signed_sin broadcastable [s, 1, 1, d] (signed_sin = [-sin, sin]).
    """
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)  # [x2, x1]
    return torch.addcmul(x * cos.to(x.dtype), swapped, signed_sin.to(x.dtype))


# ---- attention ----------------------------------------------------------------------------------
class SDPACoreAttention(torch.nn.Module):
    """Core attention through ``F.scaled_dot_product_attention`` with native GQA.

    Same call as megatron's ``DotProductAttention``: query [sq, b, np, hn], key/value [sk, b, ng, hn],
    ``attention_mask`` bool (True = masked) broadcastable to [b, np, sq, sk] or None; returns
    [sq, b, np * hn].
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 softmax_scale: float | None = None, **_kwargs) -> None:
        super().__init__()
        self.softmax_scale = softmax_scale or config.softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, **_kwargs) -> Tensor:
        sq, sk = query.shape[0], key.shape[0]
        if attention_mask is None and sq > 1:
            attention_mask = causal_mask(sk - sq, sq, device=query.device)  # bottom-right causal
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).flatten(2)  # [sq, b, np * hn]


class LeanSelfAttention(SelfAttention):
    """SelfAttention with a short forward: fused-QKV split, RoPE, KV cache, SDPA, projection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.has_qk_norm = not isinstance(self.q_layernorm, (IdentityOp, type(None)))
        self.is_plain_split = self.config.num_query_groups >= self.world_size

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                key_value_states=None, inference_context=None, rotary_pos_emb=None, **_kwargs):
        """hidden [sq, b, h] -> (output [sq, b, h], bias or None)."""
        query, key, value = self._qkv(hidden_states)  # [sq, b, np | ng, hn]
        if inference_context is not None:
            query, key, value = self._through_cache(inference_context, query, key, value, rotary_pos_emb)
        elif rotary_pos_emb is not None:
            cos, sin = rope_tables(rotary_pos_emb)
            cos, sin = cos[: query.shape[0]], sin[: query.shape[0]]
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        context = self.core_attention(query, key, value, attention_mask)  # [sq, b, np * hn]
        return self.linear_proj(context)

    def _qkv(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.is_plain_split:  # TP > query groups: megatron gathers and re-slices
            return self.get_query_key_value_tensors(hidden_states)
        mixed, _ = self.linear_qkv(hidden_states)  # [sq, b, ng * (np/ng + 2) * hn]
        groups = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups
        mixed = mixed.unflatten(-1, (groups, per_group + 2, self.hidden_size_per_attention_head))
        query = mixed[:, :, :, :per_group].flatten(2, 3)  # [sq, b, np, hn]
        key, value = mixed[:, :, :, per_group], mixed[:, :, :, per_group + 1]  # [sq, b, ng, hn]
        if self.has_qk_norm:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        return query, key, value

    def _through_cache(self, context, query: Tensor, key: Tensor, value: Tensor, rotary_pos_emb):
        """RoPE the new rows, write them to the cache, return query and the keys/values to attend."""
        keys, values = self._cache_buffers(context, key)
        position = getattr(context, "static_position", None)
        tables = rope_tables(rotary_pos_emb)
        if position is None:
            start, end = context.sequence_len_offset, context.sequence_len_offset + query.shape[0]
            if tables is not None:
                cos, sin = tables
                cos, sin = cos[start:end], sin[start:end]
                query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
            keys[start:end] = key
            values[start:end] = value
            return query, keys[:end], values[:end]
        if tables is not None:
            cos, sin = tables
            cos, sin = cos.index_select(0, position), sin.index_select(0, position)  # [R, 1, 1, d]
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        keys.index_copy_(0, position, key)
        values.index_copy_(0, position, value)
        return query, keys, values

    def _cache_buffers(self, context, key: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's (K, V) [Smax, b, ng, hn] in the context, allocated (zeroed) on first use."""
        memory = context.key_value_memory_dict
        if self.layer_number not in memory:
            shape = (context.max_sequence_length, context.max_batch_size, *key.shape[2:])
            memory[self.layer_number] = (key.new_zeros(shape), key.new_zeros(shape))
        return memory[self.layer_number]


# ---- layer --------------------------------------------------------------------------------------
class LeanTransformerLayer(TransformerLayer):
    """Pre-norm layer: x + attn(norm(x)), then + mlp(norm(.)); no dropout (inference and PDM).

    The MLP stays megatron's ``MLP`` (its constructor gets the TP group from the layer only for that
    exact class); the layer runs its linears itself: fc1, the (gated) activation, fc2.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self.mlp) is not MLP:
            raise TypeError(f"the lean layer needs megatron's dense MLP, not {type(self.mlp).__name__}")

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                rotary_pos_emb=None, inference_context=None, **_kwargs):
        """[s, b, h] -> ([s, b, h], None): megatron's (output, context) pair."""
        attn, bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask,
                                         inference_context=inference_context, rotary_pos_emb=rotary_pos_emb)
        hidden = hidden_states + (attn if bias is None else attn + bias)
        mlp, bias = self._mlp(self.pre_mlp_layernorm(hidden))
        return hidden + (mlp if bias is None else mlp + bias), None

    def _mlp(self, hidden: Tensor):
        """[s, b, h] -> (output [s, b, h], bias or None)."""
        mlp = self.mlp
        hidden, bias = mlp.linear_fc1(hidden)  # [s, b, 2f] gated (gate | up), else [s, b, f]
        if bias is not None:
            hidden = hidden + bias
        if mlp.config.gated_linear_unit:
            gate, up = hidden.chunk(2, dim=-1)  # [s, b, f] each
            hidden = mlp.config.activation_func(gate) * up
        else:
            hidden = mlp.config.activation_func(hidden)
        return mlp.linear_fc2(hidden)


def lean_layer_spec(qk_layernorm: bool):
    """Megatron's local GPT layer spec with the lean classes in place of its modules."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    spec.module = LeanTransformerLayer
    attention = spec.submodules.self_attention
    attention.module = LeanSelfAttention
    attention.submodules.core_attention = SDPACoreAttention
    attention.submodules.linear_qkv = LeanColumnParallelLinear
    attention.submodules.linear_proj = LeanRowParallelLinear
    mlp = spec.submodules.mlp
    mlp.submodules.linear_fc1 = LeanColumnParallelLinear
    mlp.submodules.linear_fc2 = LeanRowParallelLinear
    return spec
