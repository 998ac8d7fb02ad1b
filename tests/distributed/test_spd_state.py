"""SPD internals against full forwards: the draft's partial-depth inputs, and caches after rejects."""

from __future__ import annotations

import pytest
import torch
from helpers import load_hf, pipeline_forward, tiny_config
from multiproc import run_distributed

from spd_megatron.draft import AdversarialDraft, OracleDraft
from spd_megatron.draft.features import available_index
from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.schedule.spd import SPDSchedule

ANCHORS = [0, 1, 2, 3, 4]  # every hidden state of the 4-layer target, h^4 included (pre-norm)
NEW = 14


class Recorder:
    """Wraps a draft and keeps every DraftContext it was given."""

    def __init__(self, inner):
        self.inner, self.contexts = inner, []
        self.anchor_indices = tuple(ANCHORS)

    def start(self, rows):
        self.prompt_rows = rows

    def truncate(self, length):
        pass

    def propose(self, ctx, params, generator):
        self.contexts.append(ctx)
        return self.inner.propose(ctx, params, generator)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 agreement up to summation order (relative to the tensor's scale)."""
    return float((a - b).abs().max()) <= 2e-5 * (1.0 + float(b.abs().max()))


def full_hidden_states(hf, ids: list[int]) -> list[torch.Tensor]:
    """h^0..h^L of a full forward, all pre-final-norm ([s, h] each)."""
    captured = {}
    hook = hf.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(last=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        states = list(hf(torch.tensor([ids]), output_hidden_states=True).hidden_states)
    hook.remove()
    states[-1] = captured["last"]
    return [s[0] for s in states]


def _depth_worker(rank, world_size, ckpt, hf_dir, split, kind):
    cfg = tiny_config(ckpt, split=split)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = engine.schedule.generate(prompt, NEW).output_ids
    first = engine.stage.placement.is_first
    inner = {"oracle": OracleDraft, "adversarial": AdversarialDraft}[kind](prompt + ref, engine.arch.vocab_size)
    recorder = Recorder(inner) if first else None
    spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=recorder, anchors=ANCHORS)
    out = spd.generate(prompt, NEW).output_ids
    if not first:
        return
    assert out == ref
    states = full_hidden_states(load_hf(hf_dir), prompt + ref)
    n, checked = len(split), 0
    for row in recorder.prompt_rows:
        for b in ANCHORS:
            assert close(row.anchors[b], states[b][row.position])
    for ctx in recorder.contexts:
        positions = [r.position for r in ctx.rows]
        assert positions == list(range(positions[0], ctx.position)), "rows must be contiguous"
        assert ctx.rows[-1].depth == 0 and all(a.depth > b.depth for a, b in zip(ctx.rows, ctx.rows[1:]))
        for row in ctx.rows:
            needed = [b for b in ANCHORS if b <= available_index(min(row.depth, n), split)]
            assert set(needed) <= set(row.anchors), (row.position, row.depth, sorted(row.anchors))
            if ctx.tokens[:row.position + 1] != (prompt + ref)[:row.position + 1]:
                continue  # a row on a wrong (to be flushed) prefix: nothing to compare against
            for b in needed:
                assert close(row.anchors[b], states[b][row.position]), (row.position, b)
                checked += 1
    assert checked > 0


@pytest.mark.distributed
@pytest.mark.parametrize("split,kind", [((2, 2), "oracle"), ((1, 2, 1), "oracle"), ((1, 1, 2), "adversarial")])
def test_draft_rows_hold_exactly_the_partial_depth_states(tiny_models, split, kind):
    hf_dir, ckpt = tiny_models["llama"][0], tiny_models["llama"][1]
    run_distributed(_depth_worker, len(split), ckpt, hf_dir, split, kind, timeout_s=180)


def _cache_worker(rank, world_size, ckpt, new_tokens):
    cfg = tiny_config(ckpt, pp=world_size)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = engine.schedule.generate(prompt, new_tokens).output_ids
    first = engine.stage.placement.is_first
    draft = AdversarialDraft(prompt + ref, engine.arch.vocab_size) if first else None
    spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=draft)
    spd.generate(prompt, new_tokens)  # every draft rejected: one rollback per token
    cache = engine.stage.cache
    valid = len(prompt) + new_tokens - 1  # every stage processed all but the last (recovered) token
    assert cache.length >= valid
    after = {n: tuple(t.clone() for t in cache.layer_kv(n)) for n in cache.context.key_value_memory_dict}
    pipeline_forward(engine, torch.tensor([(prompt + ref)[:valid]]))  # fresh prefill of the prefix
    for layer, (k, v) in after.items():
        fresh_k, fresh_v = cache.layer_kv(layer)
        assert close(k[:valid], fresh_k[:valid]) and close(v[:valid], fresh_v[:valid]), layer


@pytest.mark.distributed
@pytest.mark.parametrize("pp,new_tokens", [(2, 9), (3, 8)])
def test_caches_after_rejects_equal_a_fresh_prefill(tiny_models, pp, new_tokens):
    run_distributed(_cache_worker, pp, tiny_models["qwen3"][1], new_tokens, timeout_s=180)


def _pdm_cache_worker(rank, world_size, ckpt, hf_dir):
    from spd_megatron.draft.base import DraftRow
    from spd_megatron.draft.pdm import PDMDraft
    from spd_megatron.engine import build_schedule

    cfg = tiny_config(ckpt, pp=2, schedule__name="spd", draft__num_layers=2, draft__anchors=[0, 2, 3])
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    result = engine.schedule.generate(prompt, 12)
    if not engine.stage.placement.is_first:
        return
    spd = engine.schedule
    assert spd.stats.rollbacks > 0  # a random PDM: rejects happened
    module = spd.draft.module
    cached = module.cache.length
    assert len(prompt) <= cached < len(prompt) + 12  # completed rows only, never in-flight ones
    layers = list(module.cache.context.key_value_memory_dict)
    after = {n: tuple(t.clone() for t in module.cache.layer_kv(n)) for n in layers}
    tokens = prompt + result.output_ids
    states = full_hidden_states(load_hf(hf_dir), tokens)
    rows = [DraftRow(p, tokens[p], 2, {b: states[b][p] for b in (0, 2, 3)}) for p in range(cached)]
    with torch.inference_mode():  # the caches were allocated in inference mode (trap J)
        PDMDraft(module).start(rows)  # fresh: every verified position as a completed row
    for n in layers:
        fresh_k, fresh_v = module.cache.layer_kv(n)
        assert close(after[n][0], fresh_k) and close(after[n][1], fresh_v), n


@pytest.mark.distributed
def test_pdm_cache_after_rejects_equals_a_fresh_prefill(tiny_models):
    run_distributed(_pdm_cache_worker, 2, tiny_models["llama"][1], tiny_models["llama"][0], timeout_s=180)
