"""The training job behind tools/train_draft.py: data -> teacher -> PDM steps -> checkpoints."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.draft.features import check_anchors, default_anchors
from spd_megatron.draft.pdm import PDMConfig, PipelineDraftModule, init_from_target, save_pdm
from spd_megatron.draft.training.data import DataStats, load_examples, split_examples
from spd_megatron.draft.training.trainer import PDMTrainer, Teacher
from spd_megatron.draft.training.vocab import build_draft_vocab
from spd_megatron.parallel.layout import split_layers

log = logging.getLogger(__name__)


def build_teacher(cfg: SPDConfig, anchors_for_split):
    """The whole target on this process (PP=1) with taps on the anchors."""
    from spd_megatron.convert.checkpoint import read_arch, read_record
    from spd_megatron.engine import build_stage, load_tokenizer, resolve_checkpoint
    from spd_megatron.parallel.init import init_parallel

    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.max_len)
    ctx = init_parallel(cfg.parallel)
    ckpt = resolve_checkpoint(cfg)
    arch = read_arch(ckpt)
    split = split_layers(arch.num_layers, cfg.train.num_stages, cfg.parallel.layers_per_stage)
    anchors = anchors_for_split(split, arch)
    stage = build_stage(cfg, ctx, ckpt, arch)
    eos = tuple(read_record(ckpt).get("eos_token_ids", ()))
    return Teacher(stage, anchors), ckpt, arch, split, load_tokenizer(ckpt), eos


def train_draft(cfg: SPDConfig) -> Path:
    """Train (or resume) a PDM; returns the folder of the final checkpoint."""
    t = cfg.train
    torch.manual_seed(t.seed)
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)

    def pick_anchors(split, arch):
        return check_anchors(cfg.draft.anchors or default_anchors(split), arch.num_layers)

    teacher, ckpt, arch, split, tokenizer, eos = build_teacher(cfg, pick_anchors)
    stats = DataStats()
    examples = load_examples(t.data, tokenizer, t.max_len, t.limit, stats=stats)
    train, held = split_examples(examples, t.held_out, t.seed)
    vocab = build_draft_vocab(train, t.draft_vocab_size, always=eos) if t.draft_vocab_size else None
    pdm_cfg = PDMConfig(list(split), teacher.anchors, t.pdm_layers,
                        vocab.token_ids if vocab else None, arch.to_dict())
    module = PipelineDraftModule(pdm_cfg, arch, dtype="float32", max_seq_len=cfg.model.max_seq_len)
    with torch.no_grad():
        init_from_target(module, ckpt)
    trainer = PDMTrainer(module, t.lr, t.warmup, t.steps, t.seed)
    resumed = _maybe_resume(trainer, out, t.resume)
    record = _train_loop(trainer, teacher, train, held, cfg, out, resumed)
    record.update(data=t.data, conversations={"train": len(train), "held_out": len(held)},
                  skipped=stats.skipped, draft_vocab_coverage=vocab.coverage if vocab else 1.0,
                  config=_train_config_dict(cfg, split))
    final = save_pdm(module, out / "final", dtype="bfloat16")
    (final / "training.json").write_text(json.dumps(record, indent=2))
    write_model_card(final, record)
    return final


def write_model_card(folder: Path, record: dict) -> None:
    """A human-readable record of how the draft was trained, next to its weights."""
    import shlex
    import sys

    last = record["history"][-1] if record["history"] else {}
    cfg = record["config"]
    lines = [
        f"# PDM for {cfg['model']} (n = {len(cfg['layers_per_stage'])}, layers per stage {cfg['layers_per_stage']})",
        "",
        f"- Data: `{record['data']}`: {record['conversations']['train']} training and "
        f"{record['conversations']['held_out']} held-out conversations (skipped: {record['skipped']}).",
        f"- Trained: {record['steps']} steps, {record['tokens_seen']} tokens seen, "
        f"{record['wall_seconds'] / 60:.1f} min wall on this machine.",
        f"- PDM: {cfg['train']['pdm_layers']} layer(s), draft vocabulary {cfg['train']['draft_vocab_size']} "
        f"(coverage of assistant tokens {record['draft_vocab_coverage']:.3f}), anchors in pdm_config.json.",
        f"- Final held-out (steady state): KL {last.get('kl', float('nan')):.3f}, "
        f"top-1 agreement with the target {last.get('agreement', float('nan')):.3f}.",
        "",
        "Held-out agreement during training:",
        "",
        "| step | tokens seen | KL | top-1 agreement |",
        "|---|---|---|---|",
        *[f"| {h['step']} | {h['tokens_seen']} | {h['kl']:.3f} | {h['agreement']:.3f} |" for h in record["history"]],
        "",
        "Reproduce:",
        "",
        "```bash",
        "python tools/train_draft.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```",
        "",
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines))


def _maybe_resume(trainer: PDMTrainer, out: Path, resume: bool) -> dict:
    latest = out / "latest"
    if resume and (latest / "trainer_state.pt").is_file():
        state = trainer.load(latest)
        log.warning("resumed from %s at step %d", latest, trainer.step)
        return state
    return {}


def _train_loop(trainer: PDMTrainer, teacher: Teacher, train, held, cfg: SPDConfig, out: Path,
                resumed: dict) -> dict:
    from tqdm.auto import tqdm

    t = cfg.train
    order = list(range(len(train)))
    random.Random(t.seed).shuffle(order)
    held_batches = [teacher.features(ex) for ex in held]
    history = resumed.get("history", [])
    tokens_seen, wall = resumed.get("tokens_seen", 0), resumed.get("wall_seconds", 0.0)
    start = time.perf_counter() - wall
    bar = tqdm(total=t.steps, initial=trainer.step, desc="train PDM", unit="step")
    while trainer.step < t.steps:
        example = train[order[trainer.step % len(order)]]
        loss, agree, count = trainer.train_step(teacher.features(example))
        tokens_seen += len(example.ids)
        elapsed = time.perf_counter() - start
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{agree:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        if trainer.step % t.eval_every == 0 or trainer.step == t.steps:
            history.append({"step": trainer.step, "tokens_seen": tokens_seen, "wall_seconds": elapsed,
                            **trainer.evaluate(held_batches)})
            bar.write(f"step {trainer.step}: held-out {history[-1]}")
        out_of_time = t.time_budget_min and elapsed > 60 * t.time_budget_min
        if trainer.step % t.save_every == 0 or out_of_time:
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


def _train_config_dict(cfg: SPDConfig, split) -> dict:
    import dataclasses

    return {"train": dataclasses.asdict(cfg.train), "layers_per_stage": list(split),
            "model": cfg.model.checkpoint or cfg.model.builtin, "dtype": cfg.model.dtype}
