"""The CUDA-graph decode step, run eagerly on CPU: the static-shape step equals the ordinary step.

``model.cuda_graphs`` captures ``DecodeGraphs._static_forward`` (the write position is a tensor,
attention spans the whole static cache). Capturing needs a GPU (tests/gpu/); what is captured
is checked here, for every tiny family (GQA, qkv bias, q/k norm, sliding window, Llama-3 RoPE
scaling), over a rollback, and inside the autoregressive and SPD schedules on two stages.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.engine import build_engine, build_schedule
from spd_megatron.parallel.init import init_parallel
from spd_megatron.target.cuda_graphs import DecodeGraphs, static_decode_mask

PROMPT = [5, 17, 99, 3, 42, 7, 250]
STEPS = [11, 12, 200, 8, 9, 64, 65, 66, 1, 2]


def run_sequence(stage, prompt, steps, start=0):
    """Prefill ``prompt`` at ``start``, then one-token steps; the [V] logits after each step."""
    out = []
    stage.forward(start, token_ids=torch.tensor([prompt]))
    for i, token in enumerate(steps):
        logits = stage.forward(start + len(prompt) + i, token_ids=torch.tensor([[token]]))  # [1, 1, V]
        out.append(logits[0, -1].clone())
    return torch.stack(out)  # [steps, V]


def counting(graphs: DecodeGraphs) -> list:
    calls = []
    original = graphs._static_forward
    graphs._static_forward = lambda: calls.append(1) or original()
    return calls


def _single_stage(rank, world_size, ckpt):
    plain = build_engine(tiny_config(ckpt, model__layer_spec="local"), init_parallel(tiny_config(ckpt).parallel))
    with torch.inference_mode():
        reference = run_sequence(plain.stage, PROMPT, STEPS)  # megatron's own cache (keys before RoPE)
    cfg = tiny_config(ckpt, model__cuda_graphs=True, model__layer_spec="local")  # set directly: validation would refuse on CPU
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    stage = engine.stage
    assert stage.decode_graphs is None  # make_decode_graphs declines a CPU stage
    with torch.inference_mode():
        eager = run_sequence(stage, PROMPT, STEPS)
        torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)  # keys cached after RoPE
        stage.decode_graphs = DecodeGraphs(stage, capture=False)
        calls = counting(stage.decode_graphs)
        static = run_sequence(stage, PROMPT, STEPS)
        assert len(calls) == len(STEPS)  # every one-token step took the static path
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
        # rollback: keep 9 positions, then different tokens; compare with a fresh eager run
        stage.cache.truncate(9)
        branch = [stage.forward(9 + i, token_ids=torch.tensor([[t]]))[0, -1].clone() for i, t in enumerate([30, 31, 32])]
        stage.decode_graphs = None
        fresh = run_sequence(stage, PROMPT + STEPS[:2], [30, 31, 32])
    torch.testing.assert_close(torch.stack(branch), fresh, rtol=1e-4, atol=1e-4)  # prefill vs steps


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral_window", "llama3_scaled"])
def test_static_step_equals_eager_step(tiny_models, family):
    run_distributed(_single_stage, 1, tiny_models[family][1], timeout_s=120)


def _two_stages(rank, world_size, ckpt):
    cfg = tiny_config(ckpt, model__cuda_graphs=True)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    cfg.schedule.name, cfg.draft.num_layers = "spd", 1
    spd = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_ar = engine.schedule.generate(prompt, 14).output_ids
    ref_spd = spd.generate(prompt, 14).output_ids
    engine.stage.decode_graphs = DecodeGraphs(engine.stage, capture=False)
    calls = counting(engine.stage.decode_graphs)
    got_ar = engine.schedule.generate(prompt, 14).output_ids
    got_spd = spd.generate(prompt, 14).output_ids  # anchors tapped inside the static step
    assert calls
    if engine.stage.placement.is_first:
        assert got_ar == ref_ar and got_spd == ref_spd == ref_ar, (got_ar, ref_ar, got_spd)


@pytest.mark.distributed
def test_static_steps_inside_the_schedules(tiny_models):
    run_distributed(_two_stages, 2, tiny_models["llama"][1], timeout_s=150)


def test_static_decode_mask():
    keys = torch.arange(8)
    assert static_decode_mask(keys, torch.tensor([3]))[0, 0, 0].tolist() == [False] * 4 + [True] * 4
    windowed = static_decode_mask(keys, torch.tensor([5]), sliding_window=2)[0, 0, 0].tolist()
    assert windowed == [True, True, True, True, False, False, True, True]  # sees 4 and 5 only
