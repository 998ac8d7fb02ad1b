"""Helpers of the GPU tests: a one-process engine on the GPU, logits runs, error measures."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (tests/gpu run on GPU machines only)")


def te_available() -> bool:
    from spd_megatron.target.specs import transformer_engine_available

    return transformer_engine_available()


needs_te = pytest.mark.skipif(not (torch.cuda.is_available() and te_available()),
                              reason="needs a CUDA GPU with Transformer Engine")


def gpu_engine(ckpt, **overrides):
    """This process as a one-rank job (NCCL on the GPU), with a TargetStage of the whole model."""
    cfg = tiny_config(ckpt, **overrides)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    assert engine.stage.device.type == "cuda"
    return engine


PROMPT = [5, 17, 99, 3, 42, 7, 250, 31, 64, 128, 12, 13]
STEPS = [11, 12, 200, 8, 9, 64, 65, 66, 1, 2, 3, 4]


@torch.inference_mode()
def full_logits(stage, ids: list[int]) -> torch.Tensor:
    """One forward over ``ids`` from position 0 -> [n, V] float32."""
    out = stage.forward(0, token_ids=torch.tensor([ids]))
    return out[0].float()


@torch.inference_mode()
def decode_logits(stage, prompt: list[int], steps: list[int], chunk: int = 5) -> torch.Tensor:
    """Chunked prefill, then one-token steps -> [steps, V] float32 (the KV-cached path)."""
    for pos in range(0, len(prompt), chunk):
        stage.forward(pos, token_ids=torch.tensor([prompt[pos:pos + chunk]]))
    rows = []
    for i, token in enumerate(steps):
        rows.append(stage.forward(len(prompt) + i, token_ids=torch.tensor([[token]]))[0, -1].float())
    return torch.stack(rows)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| over all elements."""
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(got.float().flatten(), ref.float().flatten(), dim=0))
