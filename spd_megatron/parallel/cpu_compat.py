"""Every patch that megatron-core 0.16.1 needs to run on a CPU-only machine, in one place.

See docs/megatron_cpu.md for each trap. ``apply_cpu_patches()`` is idempotent and does nothing
when CUDA is available. Import order matters: call it before building any megatron module.
"""

from __future__ import annotations

import torch

_APPLIED = False


def _cpu_current_device() -> torch.device:
    # A1: ~30 megatron sites allocate buffers on torch.cuda.current_device() (RoPE, KV cache, TP gather).
    return torch.device("cpu")


def _noop_synchronize(*args, **kwargs) -> None:
    # A2: p2p_communication synchronises after batch_isend_irecv.
    return None


def cpu_causal_mask(seq_len: int) -> torch.Tensor:
    """B: megatron's default causal mask is created with device="cuda". True = masked."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)


def apply_cpu_patches() -> bool:
    """Patch the CUDA-only call sites megatron-core hits on the decode path.

    Returns:
        True if the patches are in place (CPU machine), False on a CUDA machine.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = _cpu_current_device  # A1
    torch.cuda.synchronize = _noop_synchronize  # A2
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    # B: imported by name into fused_softmax, so both module attributes are replaced.
    transformer_utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    _APPLIED = True
    return True


def seed_megatron_rng(seed: int, outside_model_groups: bool = False) -> None:
    """E/F: megatron's CUDA RNG tracker, made to work without CUDA.

    ``inference_rng_tracker=True`` turns the tracker's add/fork into no-ops, which is all that the
    (dropout-free) decode path needs; it is used on GPUs too, where it also keeps CUDA-graph
    capture free of RNG-state reads. ``force_reset_rng`` lets this run twice in one process.
    ``outside_model_groups``: a rank in no Megatron group (a dedicated draft rank) names its ranks.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    ranks = dict(tp_rank=0, ep_rank=0, etp_rank=0) if outside_model_groups else {}
    model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=True, force_reset_rng=True, **ranks
    )
