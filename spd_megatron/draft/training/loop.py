"""The training loop: global batches -> this rank's shard -> teacher features -> one optimizer step.

Every rank walks the same stream of global micro-batches (``batches.batch_stream``) and draws the
same fills, then runs only its shard, so the run does not depend on the world size; a resumed run
(at any world size) skips the micro-batches its steps already consumed. Progress, evaluation
output, snapshots and checkpoints are rank 0's; evaluation itself is sharded over the ranks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.draft.pdm import save_pdm
from spd_megatron.draft.training.batches import batch_stream, shard, step_batches
from spd_megatron.draft.training.feature_cache import FeatureSource
from spd_megatron.draft.training.trainer import PDMTrainer, Teacher


class Progress:
    """tqdm on rank 0, silent elsewhere."""

    def __init__(self, main: bool, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train PDM", unit="step") if main else None

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(**postfix)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_loop(trainer: PDMTrainer, teacher: Teacher, train, held, cfg: SPDConfig, out: Path,
               resumed: dict, dp, deadline: Optional[float] = None, source=None) -> dict:
    """Steps until train.steps or ``deadline`` (time.monotonic()); returns the training record."""
    t = cfg.train
    source = source or FeatureSource(teacher, train)  # indices -> features (online or cached)
    lengths = [len(ex.ids) for ex in train]
    stream = batch_stream(lengths, t.batch_tokens, t.seed)
    for _ in range(trainer.step * t.accumulate):  # what the resumed steps consumed
        next(stream)
    held_batches = teacher.features_batch(held[dp.rank::dp.size])
    history = resumed.get("history", [])
    tokens_seen, wall = resumed.get("tokens_seen", 0), resumed.get("wall_seconds", 0.0)
    start, session_start, session_tokens = time.perf_counter() - wall, time.perf_counter(), 0
    bar = Progress(dp.is_main, t.steps, trainer.step)
    while trainer.step < t.steps:
        global_batches = step_batches(stream, t.accumulate)
        fills = [[trainer.draw_fill() for _ in b] for b in global_batches]  # same draws on every rank
        mine = [shard(b, lengths, dp.rank, dp.size) for b in global_batches]
        my_fills = [[f for i, f in zip(b, fl) if i in set(m)] for b, fl, m in zip(global_batches, fills, mine)]
        features = [source(m) for m in mine]
        loss, agree, _ = trainer.train_step(features, my_fills)
        step_tokens = sum(lengths[i] for b in global_batches for i in b)
        tokens_seen, session_tokens = tokens_seen + step_tokens, session_tokens + step_tokens
        elapsed = time.perf_counter() - start
        tok_s = session_tokens / max(time.perf_counter() - session_start, 1e-9)
        bar.update(loss=f"{loss:.3f}", acc=f"{agree:.3f}", tok_s=f"{tok_s:.0f}")
        if trainer.step % t.eval_every == 0 or trainer.step == t.steps:
            history.append({"step": trainer.step, "tokens_seen": tokens_seen, "wall_seconds": elapsed,
                            "train_tok_s": tok_s, **trainer.evaluate(held_batches)})
            bar.write(f"step {trainer.step}: held-out {history[-1]}")
        if dp.is_main and t.snapshot_every and trainer.step % t.snapshot_every == 0:
            snapshot(trainer, out / "snapshots" / f"step_{trainer.step}", tokens_seen, elapsed)
        out_of_time = any_rank(deadline is not None and time.monotonic() > deadline, dp)
        if dp.is_main and (trainer.step % t.save_every == 0 or out_of_time):
            trainer.save(out / "latest", {"history": history, "tokens_seen": tokens_seen, "wall_seconds": elapsed})
        if out_of_time:
            bar.write(f"time budget of {t.time_budget_min} min reached at step {trainer.step}")
            break
    bar.close()
    if not history or history[-1]["step"] != trainer.step:
        history.append({"step": trainer.step, "tokens_seen": tokens_seen,
                        "wall_seconds": time.perf_counter() - start, **trainer.evaluate(held_batches)})
    return {"steps": trainer.step, "tokens_seen": tokens_seen, "wall_seconds": time.perf_counter() - start,
            "history": history}


def any_rank(flag: bool, dp) -> bool:
    """True on every rank when it is True on one (a stop decision all ranks must share)."""
    if dp.size == 1:
        return flag
    value = torch.tensor([float(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=dp.group)
    return bool(value.item())


def snapshot(trainer: PDMTrainer, folder: Path, tokens_seen: int, elapsed: float) -> None:
    save_pdm(trainer.module, folder, dtype="bfloat16")
    record = {"step": trainer.step, "tokens_seen": tokens_seen, "wall_seconds": elapsed}
    (folder / "training.json").write_text(json.dumps(record))
