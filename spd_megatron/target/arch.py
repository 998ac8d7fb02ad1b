"""ArchSpec: the architecture facts we need from a Hugging Face config, validated once.

Supported families: Llama (incl. Llama-3 RoPE scaling), Mistral (incl. sliding window),
Qwen2/2.5 (qkv bias) and Qwen3 (q/k RMSNorm, explicit head_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from spd_megatron.errors import SPDError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_MODEL_TYPES = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (HF ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ArchSpec:
    """A decoder-only transformer, described in HF terms (all sizes unsharded)."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    family: str  # llama | mistral | qwen2 | qwen3
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = HF num_key_value_heads
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    sliding_window: Optional[int] = None
    rope_scaling: Optional[RopeScaling] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: (heads + 2 * kv heads) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim


def arch_from_hf_config(hf_config: Any) -> ArchSpec:
    """Build an ArchSpec from a transformers ``PretrainedConfig`` (or its dict).

    Raises:
        SPDError: the architecture or one of its options is not supported.
    """
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    architecture = (cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type"), "?")])[0]
    family = SUPPORTED_ARCHITECTURES.get(architecture)
    if family is None:
        raise SPDError(
            f"unsupported architecture '{architecture}' (model_type '{cfg.get('model_type')}'); "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    _reject_unsupported_options(cfg, architecture, family)
    heads = cfg["num_attention_heads"]
    return ArchSpec(
        architecture=architecture,
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(_rope_parameters(cfg).get("rope_theta", 10000.0)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        sliding_window=_sliding_window(cfg, family),
        rope_scaling=_rope_scaling(cfg, architecture),
    )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5.x: rope_parameters={rope_theta, rope_type, ...}; 4.x: rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in params and cfg.get("rope_theta") is not None:
        params["rope_theta"] = cfg["rope_theta"]
    if cfg.get("rope_scaling"):
        params = {**cfg["rope_scaling"], **params}
    return params


def _rope_scaling(cfg: dict[str, Any], architecture: str) -> Optional[RopeScaling]:
    params = _rope_parameters(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise SPDError(
            f"{architecture} uses rope_type '{rope_type}', which spd_megatron does not support; "
            "supported: default, llama3"
        )
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(cfg: dict[str, Any], family: str) -> Optional[int]:
    if family == "mistral":
        return cfg.get("sliding_window")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        return cfg["sliding_window"]
    return None


def _reject_unsupported_options(cfg: dict[str, Any], architecture: str, family: str) -> None:
    if cfg.get("attention_bias") and family != "qwen2":
        raise SPDError(f"{architecture} with attention_bias=true (biased o_proj) is not supported")
    if cfg.get("mlp_bias"):
        raise SPDError(f"{architecture} with mlp_bias=true is not supported")
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise SPDError(
            f"{architecture} with use_sliding_window=true (per-layer windows) is not supported"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SPDError(f"{architecture} with hidden_act '{act}' is not supported (only silu)")
