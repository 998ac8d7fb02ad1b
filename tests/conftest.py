"""Shared fixtures: tiny converted checkpoints built once per session (seeded, no download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Import megatron in the parent so forked test ranks start in 0.5 s instead of 10 s.
import megatron.core.models.gpt  # noqa: E402,F401

from spd_megatron.parallel.cpu_compat import apply_cpu_patches  # noqa: E402

apply_cpu_patches()
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (hf_dir, checkpoint_dir) for every tiny family, fp32."""
    from tiny_models import FAMILIES, make_tiny_hf

    from spd_megatron.convert.pipeline import convert_hf_to_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        hf_dir = make_tiny_hf(family, root / f"{family}-hf")
        ckpt = convert_hf_to_checkpoint(hf_dir, root / f"{family}-ckpt", "float32", show_progress=False)
        out[family] = (hf_dir, ckpt)
    return out
