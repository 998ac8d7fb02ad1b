"""FP8 decoding through Transformer Engine (``model.fp8=true``; TE layer spec on a GPU only).

The recipe: TE ``Float8CurrentScaling`` (megatron ``fp8_recipe="tensorwise"``), HYBRID format
(E4M3 for forward tensors). Every FP8 cast takes its scale from the tensor's own amax in that
very forward, so there is no scaling state on the host and nothing to calibrate. Megatron's
TransformerBlock enters TE's ``fp8_autocast`` with this recipe around the decoder layers when
``config.fp8`` is set; embedding, attention softmax and the output layer stay in bf16.

Why not delayed scaling (TE ``DelayedScaling``, scales from an amax history): TE folds the amax
history into new scales only when the outermost ``fp8_autocast`` exits with gradients enabled
and outside a graph capture (``autocast_exit``/``fp8_autocast_exit``: ``not _graph and
torch.is_grad_enabled()``; pytorch/fp8.py in TE 2.4, pytorch/quantization.py in 2.9-2.12 and
main). Decoding runs under ``torch.inference_mode()``, so every scale would stay at its initial
1.0: E4M3 would clip values above 448 and flush those below ~2^-9. Current scaling appeared in
TE 2.2 (megatron maps ``tensorwise`` to it from TE 2.2.0.dev0), so older TE is refused.

FP8 GEMMs need the token rows to be a multiple of 8 (TE asserts it); a decode step has one row.
``pad_for_fp8`` wraps the TE linears with megatron's ``prepare_model_for_fp8_inference`` (pads
rows inside the linear, unpads the output).

Transformer Engine is imported only inside these functions, never at module import.
"""

from __future__ import annotations

from typing import Optional

import torch

from spd_megatron.errors import SPDError

MIN_TE_VERSION = "2.2.0.dev0"  # Float8CurrentScaling (megatron-core: fp8_recipe="tensorwise")
MCORE_TESTED_TE = ("2.9.0a0", "2.12.0")  # megatron-core 0.16.1's dev extra: >=2.9.0a0,<2.12.0
FP8_RECIPE = dict(fp8="hybrid", fp8_recipe="tensorwise")


def fp8_recipe_fields(te_version: Optional[str]) -> dict:
    """The TransformerConfig FP8 fields for the installed TE version (pure; unit-tested).

    Raises:
        SPDError: no TE, or a TE without current scaling.
    """
    from packaging.version import Version

    if te_version is None:
        raise SPDError("model.fp8=true needs Transformer Engine (pip install the te extra on a GPU "
                       "node, or use the docker image); drop model.fp8 to decode in bf16")
    if Version(te_version) < Version(MIN_TE_VERSION):
        raise SPDError(f"model.fp8=true needs Transformer Engine >= 2.2 (current scaling), found "
                       f"{te_version}: older TE only has delayed scaling, whose scales never leave "
                       "1.0 in inference mode; upgrade TE or drop model.fp8")
    return dict(FP8_RECIPE)


def installed_te_version() -> Optional[str]:
    """Transformer Engine's version, or None when it does not import."""
    try:
        from megatron.core.utils import get_te_version

        version = get_te_version()
    except Exception:  # noqa: BLE001 - any import failure means no usable TE
        return None
    return None if version is None else str(version)


def fp8_config_fields(enabled: bool, te_version: Optional[str] = None) -> dict:
    """The TransformerConfig fields for FP8 (empty when off: bf16/fp32 as ``model.dtype`` says).

    ``te_version``: for tests; by default the installed one.
    """
    if not enabled:
        return {}
    return fp8_recipe_fields(te_version if te_version is not None else installed_te_version())


def te_support_line(te_version: Optional[str] = "installed") -> str:
    """One line on what the (installed) Transformer Engine allows (printed by the docker build)."""
    from packaging.version import Version

    version = installed_te_version() if te_version == "installed" else te_version
    if version is None:
        return "Transformer Engine: not installed (layer_spec=auto picks a spec without TE; no FP8)"
    fp8 = "FP8 (current scaling) available" if Version(version) >= Version(MIN_TE_VERSION) else \
        "no FP8 (needs >= 2.2)"
    low, high = MCORE_TESTED_TE
    tested = "within" if Version(low) <= Version(version) < Version(high) else "OUTSIDE"
    return f"Transformer Engine {version}: {fp8}; {tested} megatron-core 0.16.1's tested range 2.9-2.11"


def pad_for_fp8(model: torch.nn.Module) -> None:
    """Let one-token steps use FP8 GEMMs: TE linears pad their rows to FP8's multiple."""
    from megatron.core.fp8_utils import prepare_model_for_fp8_inference

    prepare_model_for_fp8_inference(model)
