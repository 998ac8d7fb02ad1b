"""FP8 decoding through Transformer Engine (``model.fp8=true``; TE layer spec on a GPU only).

The recipe (``FP8_RECIPE``, TransformerConfig fields): TE ``DelayedScaling`` with the HYBRID
format (E4M3 forward tensors; E5M2 would only be used for gradients), a scale per tensor from the
max amax of the last 1024 forwards, margin 0. Megatron's TransformerBlock enters
``te.pytorch.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(...))`` around the decoder
layers itself when ``config.fp8`` is set, so a stage forward runs its TE linears in FP8 and
everything else (embedding, attention softmax, output layer) in the model dtype (bf16).

Two inference details, both handled here:

- FP8 GEMMs need the token rows to be a multiple of 8 (TE asserts it); a decode step has one row.
  ``pad_for_fp8`` wraps the TE linears with megatron's ``prepare_model_for_fp8_inference``
  (pads rows inside the linear, unpads the output).
- Delayed scaling starts every tensor at scale 1 and megatron's TE linears cast the weights to
  FP8 once (first forward) and reuse that cast. ``calibrate_fp8`` runs one throw-away forward so
  the amax history holds the real weight ranges, then marks the linears to re-cast their weights
  with the calibrated scales on the next forward.

Transformer Engine is imported only inside these functions, never at module import.
"""

from __future__ import annotations

import torch

FP8_RECIPE = dict(
    fp8="hybrid",  # TE Format.HYBRID
    fp8_recipe="delayed",  # TE DelayedScaling
    fp8_amax_history_len=1024,
    fp8_amax_compute_algo="max",
    fp8_margin=0,
)
CALIBRATION_ROWS = 16


def fp8_config_fields(enabled: bool) -> dict:
    """The TransformerConfig fields for FP8 (empty when off: bf16/fp32 as ``model.dtype`` says)."""
    return dict(FP8_RECIPE) if enabled else {}


def pad_for_fp8(model: torch.nn.Module) -> None:
    """Let one-token steps use FP8 GEMMs: TE linears pad their rows to FP8's multiple."""
    from megatron.core.fp8_utils import prepare_model_for_fp8_inference

    prepare_model_for_fp8_inference(model)


def calibrate_fp8(stage) -> None:
    """One throw-away forward of random inputs at position 0, then re-cast the FP8 weights.

    Args:
        stage: a TargetStage built with ``fp8=True``; its KV cache is left empty.
    """
    rows = min(CALIBRATION_ROWS, stage.cache.max_seq_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        if stage.placement.is_first:
            ids = torch.randint(stage.arch.vocab_size, (1, rows), generator=gen).to(stage.device)
            stage.eager_forward(0, rows, ids, None)
        else:
            dtype = next(stage.model.parameters()).dtype
            hidden = torch.randn(rows, 1, stage.arch.hidden_size, generator=gen).to(stage.device, dtype)
            stage.eager_forward(0, rows, None, hidden)
        stage.cache.truncate(0)
    recast_fp8_weights(stage.model)


def recast_fp8_weights(model: torch.nn.Module) -> int:
    """Make every megatron TE linear cast its weights to FP8 again on its next forward.

    Returns:
        How many linears were marked.
    """
    marked = 0
    for module in model.modules():
        if hasattr(module, "is_first_microbatch"):
            module.is_first_microbatch = True
            marked += 1
    return marked
