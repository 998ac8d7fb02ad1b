"""GPU tests: skipped as a whole without CUDA (see gpu_helpers.needs_cuda); bf16 tiny checkpoints."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory):
    """family -> bf16 checkpoint folder (TE and FP8 compare in the dtype they run in)."""
    from tiny_models import make_tiny_hf

    from spd_megatron.convert.pipeline import convert_hf_to_checkpoint

    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for family in ("llama", "qwen3", "mistral_window"):
        hf_dir = make_tiny_hf(family, root / f"{family}-hf")
        out[family] = convert_hf_to_checkpoint(hf_dir, root / f"{family}-ckpt", "bfloat16", show_progress=False)
    return out
