"""The lean layer spec (target/lean.py) computes what Megatron's local spec computes.

Per family (GQA, qkv bias, q/k norm, sliding window, Llama-3 RoPE scaling): a lean and a local stage
built from the same checkpoint give the same logits over a chunked prefill, one-token steps, a
rollback and a multi-token step; their state dicts have the same names and shapes. At TP = 1 the
lean linears are plain ``F.linear`` calls, at TP = 2 they run Megatron's parallel forward.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.engine import build_engine, build_stage
from spd_megatron.parallel.init import init_parallel
from spd_megatron.target.lean import LeanColumnParallelLinear, LeanRowParallelLinear

FAMILIES = ["llama", "qwen2", "qwen3", "mistral_window", "llama3_scaled"]
PROMPT = [5, 17, 99, 3, 42, 7, 250, 31, 8]


def decode_logits(stage) -> torch.Tensor:
    """Prefill in two chunks, 4 one-token steps, roll back to 10, then a 3-token step: [10, V]."""
    out = []
    with torch.inference_mode():
        stage.forward(0, token_ids=torch.tensor([PROMPT[:4]]))
        out.append(stage.forward(4, token_ids=torch.tensor([PROMPT[4:]]))[0, -1])
        for i, token in enumerate([11, 12, 200, 64]):
            out.append(stage.forward(len(PROMPT) + i, token_ids=torch.tensor([[token]]))[0, -1])
        stage.cache.truncate(10)
        out.extend(stage.forward(10, token_ids=torch.tensor([[30, 31, 32]]))[0, :3].unbind(0))
        out.extend(stage.forward(13, token_ids=torch.tensor([[33]]))[0].unbind(0))
    return torch.stack(out).float()  # [10, V]


def _compare(rank, world_size, tp, cases):
    for family, ckpt in cases:
        cfg = tiny_config(ckpt, tp=tp, model__layer_spec="local")
        engine = build_engine(cfg, init_parallel(cfg.parallel))
        cfg.model.layer_spec = "lean"
        lean = build_stage(cfg, engine.ctx, engine.checkpoint, engine.arch)
        ref_sd, lean_sd = engine.stage.model.state_dict(), lean.model.state_dict()
        assert list(ref_sd) == list(lean_sd), family
        assert all(getattr(ref_sd[k], "shape", None) == getattr(lean_sd[k], "shape", None) for k in ref_sd)
        linears = [m for m in lean.model.modules()
                   if isinstance(m, (LeanColumnParallelLinear, LeanRowParallelLinear))]
        assert linears and all(m.is_plain == (tp == 1) for m in linears)
        torch.testing.assert_close(decode_logits(lean), decode_logits(engine.stage), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{family} TP{tp}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_lean_equals_local(tiny_models, tp):
    cases = [(f, tiny_models[f][1]) for f in FAMILIES]
    run_distributed(_compare, tp, tp, cases, timeout_s=180)
