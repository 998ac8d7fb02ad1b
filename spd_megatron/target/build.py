"""ArchSpec + parallel layout -> a Megatron TransformerConfig and this rank's GPTModel stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spd_megatron.target.arch import ArchSpec
from spd_megatron.target.fp8 import fp8_config_fields
from spd_megatron.target.specs import build_layer_spec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StagePlacement:
    """Where this rank sits: its pipeline stage, TP slot and global layer range."""

    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    layers_per_stage: tuple[int, ...]

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def layer_start(self) -> int:
        return sum(self.layers_per_stage[: self.pp_rank])

    @property
    def layer_end(self) -> int:
        return self.layer_start + self.layers_per_stage[self.pp_rank]


def pipeline_layout(layers_per_stage: tuple[int, ...]) -> list[list[str]] | None:
    """Megatron's explicit per-stage layer layout; it also allows uneven splits like 8/8/7/7."""
    if len(layers_per_stage) == 1:
        return None
    layout = [["decoder"] * k for k in layers_per_stage]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def to_transformer_config(arch: ArchSpec, placement: StagePlacement, dtype: str, fp8: bool = False,
                          initialize: bool = False):
    """The one place where our names become Megatron's TransformerConfig."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch_dtype = TORCH_DTYPES[dtype]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=placement.tp_size,
        pipeline_model_parallel_size=placement.pp_size,
        pipeline_model_parallel_layout=pipeline_layout(placement.layers_per_stage),
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=initialize,  # False: weights come from a checkpoint
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=torch_dtype == torch.bfloat16,
        **fp8_config_fields(fp8),
    )


def build_stage_model(arch: ArchSpec, placement: StagePlacement, dtype: str, spec_name: str,
                      max_seq_len: int, fp8: bool = False, pre_process: bool | None = None,
                      post_process: bool | None = None, initialize: bool = False, pg_collection=None,
                      static_decode: bool = False):
    """Build this rank's GPTModel stage (embedding on the first, norm + output layer on the last).

    Embeddings are never shared with the output layer: the checkpoint always holds
    ``output_layer.weight`` (a copy when the HF model ties them), which avoids megatron's
    cross-stage tied-weight all-reduce and its CUDA-only setup. ``static_decode``: the attention
    that CUDA-graph steps need (``target/cuda_graphs.py``). ``fp8`` (TE spec only): megatron's
    TransformerBlock runs the layers under TE's ``fp8_autocast`` with ``target/fp8.py``'s recipe,
    and the TE linears pad token rows to FP8's GEMM shapes.
    """
    from megatron.core.models.gpt import GPTModel

    config = to_transformer_config(arch, placement, dtype, fp8, initialize)
    model = GPTModel(
        config,
        build_layer_spec(spec_name, arch.qk_layernorm, static_decode),
        vocab_size=arch.vocab_size,
        max_sequence_length=max(max_seq_len, arch.max_position_embeddings),
        pre_process=placement.is_first if pre_process is None else pre_process,
        post_process=placement.is_last if post_process is None else post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        pg_collection=pg_collection,
    )
    if arch.rope_scaling is not None:
        apply_llama3_rope_scaling(model.rotary_pos_emb, arch)
    model.to(TORCH_DTYPES[dtype])  # RMSNorm weights are created fp32 even in bf16 mode
    if fp8:
        from spd_megatron.target.fp8 import pad_for_fp8

        pad_for_fp8(model)
    return model.eval()


def apply_llama3_rope_scaling(rotary, arch: ArchSpec) -> None:
    """Llama-3 frequency scaling with the checkpoint's own factors.

    GPTModel only passes ``factor`` and megatron hard-codes the other three (1, 4, 8192); we call
    its scaling function with all four, before the first forward fills its lru_cache.
    """
    dim = arch.head_dim
    base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
    s = arch.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        base.to(rotary.inv_freq.device), factor=s.factor, low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings,
    )
