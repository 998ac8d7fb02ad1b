"""Lossless sampling: SPD's sampled tokens follow the target's exact distribution.

Tiny target, temperature 1 with top-k 3 (so the support is small and exact), a deliberately poor
random draft (most drafts are rejected, so residual sampling is exercised). The joint law of the
first three new tokens is computed exactly from Hugging Face forwards; a chi-square test at
significance 1e-3 compares it with N SPD samples. With N = 2400 the test rejects any law at total
variation 0.05 from the exact one (checked below against a shifted reference).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import load_hf, tiny_config
from multiproc import run_distributed

from spd_megatron.draft import RandomDraft
from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.sampling.logits import SamplingParams, target_probs
from spd_megatron.schedule.spd import SPDSchedule

PARAMS = SamplingParams(temperature=1.0, top_k=3)
PROMPT = [257, 72, 101, 108, 108, 111, 258, 257]
SAMPLES, NEW = 2400, 3


def _sample_worker(rank, world_size, ckpt, out_file, placement):
    cfg = tiny_config(ckpt, sampling__temperature=1.0, sampling__top_k=3, schedule__name="spd",
                      draft__placement=placement)
    engine = build_engine(cfg, init_parallel(cfg.parallel, extra_ranks=int(placement == "dedicated")))
    poor = RandomDraft(260, seed=9, scale=1.0)
    if placement == "dedicated":  # the engine's schedules (anchors agree); a poor draft on its rank
        spd = engine.schedule
        if engine.ctx.is_draft_rank:
            spd.host.draft = poor
    else:
        draft = poor if engine.stage.placement.is_first else None
        spd = SPDSchedule(engine.stage, engine.schedule.link, PARAMS, seed=11, draft=draft)
    outs, rollbacks = [], 0
    for _ in range(SAMPLES):
        result = spd.generate(PROMPT, NEW)
        outs.append(tuple(result.output_ids))
        rollbacks += result.stats.rollbacks
    if engine.stage is not None and engine.stage.placement.is_first:
        torch.save({"outs": outs, "rollbacks": rollbacks}, out_file)


def exact_joint(hf) -> dict[tuple, float]:
    """P(t1, t2, t3) under the warped target, by enumerating the top-k support."""
    law = {(): 1.0}
    for _ in range(NEW):
        nxt = {}
        for prefix, p in law.items():
            with torch.no_grad():
                probs = target_probs(hf(torch.tensor([PROMPT + list(prefix)])).logits[0, -1], PARAMS)
            for tok in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (tok,)] = p * float(probs[tok])
        law = nxt
    return law


def chi_square_pvalue(counts: dict, law: dict, n: int) -> float:
    cells = sorted(law, key=law.get, reverse=True)
    big = [c for c in cells if law[c] * n >= 5]
    rest_p = 1.0 - sum(law[c] for c in big)
    observed = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    expected = [law[c] * n for c in big] + [rest_p * n]
    pairs = [(o, e) for o, e in zip(observed, expected) if e > 0]
    stat = sum((o - e) ** 2 / e for o, e in pairs)
    df = torch.tensor((len(pairs) - 1) / 2, dtype=torch.float64)
    return float(1 - torch.special.gammainc(df, torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.distributed
@pytest.mark.parametrize("placement", ["colocated", "dedicated"])
def test_spd_sampling_matches_target_distribution(tiny_models, tmp_path, placement):
    hf_dir, ckpt = tiny_models["llama"]
    out = tmp_path / "samples.pt"
    run_distributed(_sample_worker, 2 + (placement == "dedicated"), ckpt, str(out), placement, timeout_s=400)
    result = torch.load(out)
    outs = result["outs"]
    assert result["rollbacks"] > 0  # the poor draft was rejected: residual sampling ran
    counts = {}
    for o in outs:
        counts[o] = counts.get(o, 0) + 1
    law = exact_joint(load_hf(hf_dir))
    assert sum(law.values()) == pytest.approx(1.0, rel=1e-5) and set(counts) <= set(law)
    assert chi_square_pvalue(counts, law, len(outs)) > 1e-3
    # Power: the same samples must reject a law moved by total variation 0.05.
    top, low = max(law, key=law.get), min(law, key=law.get)
    shifted = dict(law)
    moved = min(0.05, law[top])
    shifted[top] -= moved
    shifted[low] += moved
    assert chi_square_pvalue(counts, shifted, len(outs)) < 1e-3
