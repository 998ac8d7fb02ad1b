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
