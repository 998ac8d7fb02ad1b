"""Test helpers shared by the unit and distributed tests (no fixtures here)."""

from __future__ import annotations

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.parallel.link import Header, Op


def tiny_config(ckpt, tp: int = 1, pp: int = 0, split=(), **overrides) -> SPDConfig:
    cfg = SPDConfig()
    cfg.model.checkpoint = str(ckpt)
    cfg.model.max_seq_len = 96
    cfg.parallel.tensor_parallel_size = tp
    cfg.parallel.pipeline_parallel_size = pp
    cfg.parallel.layers_per_stage = list(split)
    cfg.parallel.timeout_s = 60
    cfg.schedule.prefill_chunk_size = 5  # several chunks, so chunked prefill is exercised
    cfg.draft.allow_random = True  # no trained draft exists for the tiny models
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        setattr(getattr(cfg, section), field, value) if field else setattr(cfg, section, value)
    return cfg


def pipeline_forward(engine, ids: torch.Tensor, start: int = 0) -> torch.Tensor | None:
    """One multi-token forward through all stages; logits [1, n, V] on the last stage, else None."""
    stage, link = engine.stage, engine.schedule.link
    with torch.inference_mode():
        if stage.placement.is_first:
            out = stage.forward(start, token_ids=ids)
        else:
            header = link.recv_prev()
            start = header.position
            out = stage.forward(start, hidden=link.recv_hidden(header.count))
        if not stage.placement.is_last:
            count = out.shape[0]  # [count, 1, h]
            link.send_next(Header(Op.PREFILL, start, count, start + count), out)
            link.flush()
            return None
    return out


def hf_greedy(hf_model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full HF forwards (no cache): the simplest possible oracle."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(ids):]


def load_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


PDM_SCRIPT = [  # (position, depth) rows per cycle for n = 2 after a 7-token prompt; "cut" = reject
    [(7, 0)], [(7, 1), (8, 0)], [(7, 2), (8, 1), (9, 0)], [(8, 2), (9, 1), (10, 0)],
    [(9, 2), (10, 1), (11, 0)], ("cut", 11), [(10, 2), (11, 0)], [(11, 1), (12, 0)],
    [(11, 2), (12, 1), (13, 0)], [(12, 2), (13, 1), (14, 0)],
]


def pdm_cycles(draft, hidden_size: int, anchors=(0, 2, 4), seed: int = 3) -> torch.Tensor:
    """Drive a PDMDraft like SPD with n = 2 does (``PDM_SCRIPT``: a filling pipeline of 1, 2, then 3
    rows, a reject and a refill); returns the draft's q over the vocabulary per cycle [cycles, V]."""
    from spd_megatron.draft.base import DraftContext, DraftRow
    from spd_megatron.sampling.logits import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    feats = {p: {k: torch.randn(hidden_size, generator=gen) for k in anchors} for p in range(16)}
    draft.start([DraftRow(p, p % 7, 2, feats[p]) for p in range(7)])
    params, sample_gen = SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)
    qs = []
    for step in PDM_SCRIPT:
        if step[0] == "cut":
            draft.truncate(step[1])
            continue
        rows = [DraftRow(p, p % 7, d, feats[p]) for p, d in step]
        newest = step[-1][0]
        ctx = DraftContext(newest + 1, [p % 7 for p in range(newest + 1)], rows, step[0][0])
        with torch.inference_mode():
            qs.append(draft.propose(ctx, params, sample_gen).probs.clone())
    return torch.stack(qs)  # [cycles, V]
