"""model.compile (target/compiled.py): compiled steps equal eager ones, never recompile in a decode,
and fall back to eager with one warning when compiling fails.

Compiling with inductor is slow on 2 cores, so inductor runs once (tiny Llama, one-token step);
the other checks trace with dynamo's ``eager`` backend or a counting one (same graphs, no codegen).
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.draft.pdm import PDMConfig, PDMDraft, PipelineDraftModule
from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.target.compiled import CompiledPDMStep, CompiledSteps, enable_compiled_step

PROMPT = [5, 17, 99, 3, 42, 7, 250, 31, 8, 4]  # two prefill chunks of 5


def decode(stage) -> torch.Tensor:
    """Chunked prefill, one-token steps, a rollback, more steps: the logits of every step [n, V]."""
    out = []
    with torch.inference_mode():
        stage.cache.truncate(0)
        for start in range(0, len(PROMPT), 5):
            out.append(stage.forward(start, token_ids=torch.tensor([PROMPT[start:start + 5]]))[0, -1])
        for i, token in enumerate([11, 12, 200, 64]):
            out.append(stage.forward(len(PROMPT) + i, token_ids=torch.tensor([[token]]))[0, -1])
        stage.cache.truncate(11)
        for i, token in enumerate([30, 31]):
            out.append(stage.forward(11 + i, token_ids=torch.tensor([[token]]))[0, -1])
    return torch.stack(out).float()


def counting_backend(calls: list):
    def backend(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    return backend


def attach(stage, backend, rows=(1, 5)):
    with torch.inference_mode():
        stage.cache.truncate(0)
        stage.compiled = CompiledSteps(stage.model, stage.cache, rows, stage.arch.sliding_window, backend)
        stage.warm_up_compiled()
    return stage.compiled


def _stage_checks(rank, world_size, families):
    for family, ckpt in families:
        cfg = tiny_config(ckpt)
        stage = build_engine(cfg, init_parallel(cfg.parallel)).stage
        eager = decode(stage)
        calls = []
        compiled = attach(stage, counting_backend(calls))
        assert calls and compiled.disabled is None and compiled.compile_seconds > 0
        compiled_before = len(calls)
        torch._dynamo.config.error_on_recompile = True  # a recompile raises -> the step disables itself
        try:
            traced = decode(stage)
        finally:
            torch._dynamo.config.error_on_recompile = False
        assert compiled.disabled is None, compiled.disabled
        assert len(calls) == compiled_before, "a decode compiled a new graph"
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5, msg=lambda m: f"{family}: {m}")
        torch._dynamo.reset()


def _inductor_and_fallback(rank, world_size, ckpt, caplog_level):
    cfg = tiny_config(ckpt)
    stage = build_engine(cfg, init_parallel(cfg.parallel)).stage
    eager = decode(stage)
    attach(stage, "inductor", rows=(1,))
    torch.testing.assert_close(decode(stage), eager, rtol=1e-5, atol=1e-5)

    def broken(gm, example_inputs):
        raise RuntimeError("forced compile failure")

    torch._dynamo.reset()
    records = []
    handler = logging.Handler(caplog_level)
    handler.emit = records.append
    logging.getLogger("spd_megatron.target.compiled").addHandler(handler)
    compiled = attach(stage, broken)
    torch.testing.assert_close(decode(stage), eager, rtol=1e-5, atol=1e-5)
    assert compiled.disabled and "forced compile failure" in compiled.disabled
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1


def _pdm_checks(rank, world_size, ckpt):
    cfg = tiny_config(ckpt)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    torch.manual_seed(0)
    module = PipelineDraftModule(PDMConfig([2, 2], [0, 2, 4], 1), engine.arch, max_seq_len=64).eval()
    with torch.inference_mode():  # rows made as the schedule makes them (inference tensors)
        rows = torch.randn(12, 1, engine.arch.hidden_size)
        draft = PDMDraft(module)
        eager = pdm_sequence(draft, rows)
        calls = []
        module.cache.truncate(0)  # the warm-up compiles on an empty cache
        draft.graphs = CompiledPDMStep(module, counting_backend(calls))
        before = len(calls)
        traced = pdm_sequence(draft, rows)
    assert draft.graphs.steps.disabled is None and len(calls) == before
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def pdm_sequence(draft, rows) -> torch.Tensor:
    """Completed rows 0..5 cached, then 3-row and 2-row steps, a rollback to 7, a 1-row step."""
    module, out = draft.module, []
    module.cache.truncate(0)
    module(rows[:6], 0)
    for start, count in ((6, 3), (6, 3), (7, 2)):
        module.cache.truncate(start)
        logits = draft.graphs.step(rows[start:start + count], start) if draft.graphs else None
        if logits is None:
            logits = module.logits(module(rows[start:start + count], start)[-1, 0]).float()
        out.append(logits)
    module.cache.truncate(7)
    return torch.stack(out)


def _engine_path(rank, world_size, ckpt):
    """model.compile=on as the engine enables it (outside inference mode), then a real decode."""
    cfg = tiny_config(ckpt)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = PROMPT + [9, 10, 12, 13, 14]  # 15 tokens: three prefill chunks of 5
    first = engine.schedule.generate(prompt, 8, eos_token_ids=())
    eager = first.output_ids
    assert first.stats.compile_seconds == 0.0  # eager: nothing compiled
    cfg.model.compile = "on"
    calls = []
    engine.stage.cache.truncate(0)
    enable_compiled_step(cfg, engine.ctx, engine.stage, backend=counting_backend(calls))
    compiled, before = engine.stage.compiled, len(calls)
    torch._dynamo.config.error_on_recompile = True
    try:
        result = engine.schedule.generate(prompt, 8, eos_token_ids=())
        out = result.output_ids
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert compiled.disabled is None, compiled.disabled
    assert len(calls) == before, "the decode compiled a new graph"
    assert out == eager
    assert result.stats.compile_seconds == compiled.compile_seconds > 0  # reported in the stats


@pytest.mark.distributed
def test_engine_path_compiles_at_start_up_only(tiny_models):
    run_distributed(_engine_path, 1, tiny_models["llama"][1], timeout_s=240)


@pytest.mark.distributed
def test_compiled_steps_equal_eager_without_recompiling(tiny_models):
    families = [(f, tiny_models[f][1]) for f in ("llama", "qwen3", "mistral_window", "llama3_scaled")]
    run_distributed(_stage_checks, 1, families, timeout_s=240)


@pytest.mark.distributed
def test_inductor_step_and_forced_failure(tiny_models):
    run_distributed(_inductor_and_fallback, 1, tiny_models["llama"][1], logging.WARNING, timeout_s=400)


@pytest.mark.distributed
def test_compiled_pdm_equals_eager(tiny_models):
    run_distributed(_pdm_checks, 1, tiny_models["llama"][1], timeout_s=240)
