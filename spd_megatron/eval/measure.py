"""Measure one configuration on a prompt set: every rank runs it, rank 0 appends the records.

Our schedules run in this process group (any launcher, any schedule and draft); the HF
baselines run in one process. Both skip the prompts already in the configuration's JSONL, warm
up on one short decode first (allocation costs stay out of the numbers), and show a progress bar
on rank 0.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Optional

from spd_megatron.config import SPDConfig
from spd_megatron.errors import SPDError
from spd_megatron.eval.prompts import PromptItem, encode_prompt, read_prompt_set
from spd_megatron.eval.records import ResultsFile, fingerprint, make_record

WARMUP_TOKENS = 4


@dataclass
class RunInfo:
    """What rank 0 knows after a configuration ran (the orchestrator sizes the baselines from it)."""

    name: str
    world_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    threads_per_process: int
    decoded: int  # prompts decoded in this session (the others were already in the file)


def config_name(cfg: SPDConfig) -> str:
    return cfg.eval.name or (cfg.schedule.name if cfg.eval.runner == "schedule" else cfg.eval.runner)


def session_info(world_size: int, tp: int, pp: int) -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "nproc": os.cpu_count(),
            "world_size": world_size, "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
            "threads_per_process": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg_1min": os.getloadavg()[0], "argv": sys.argv}


def progress(items: list, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, desc=name, unit="prompt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def run_schedule_eval(cfg: SPDConfig, ctx=None, make_schedule=None) -> Optional[RunInfo]:
    """Decode the prompts not yet in ``<eval.out>/<name>.jsonl`` with our schedule (every rank).

    Args:
        cfg: the config (schedule, draft, parallel layout, prompts, max_new_tokens, sampling).
        ctx: an existing ParallelContext (tests), else the launcher's processes are joined.
        make_schedule: ``make_schedule(engine)`` gives the schedule to decode with instead of the
            configured one (tests: scripted drafts).

    Returns:
        The run info on rank 0, None on the other ranks.
    """
    from spd_megatron.engine import build_engine

    items = read_prompt_set(cfg.prompts_file, cfg.prompts_limit)  # a bad file fails before model work
    engine = build_engine(cfg, ctx)
    ctx, name = engine.ctx, config_name(cfg)
    results, done = open_results(cfg, ctx, name)
    todo = [item for item in items if item.id not in done]
    schedule = make_schedule(engine) if make_schedule else engine.schedule
    seed_state = schedule.generator.get_state()
    for i, item in enumerate(progress(todo, name, ctx.rank == 0)):
        ids = encode_prompt(engine.tokenizer, item.text, cfg.chat_template, cfg.system_prompt)
        if i == 0:
            schedule.generate(ids, min(WARMUP_TOKENS, cfg.max_new_tokens), engine.eos_token_ids)
        schedule.generator.set_state(seed_state)  # each prompt samples alike, resumed or not
        result = schedule.generate(ids, cfg.max_new_tokens, engine.eos_token_ids)
        if results is not None:
            text = engine.tokenizer.decode(result.output_ids, skip_special_tokens=True)
            results.append(make_record(name, item.id, item.text, result.output_ids, text, result.stats.to_dict()))
    if ctx.rank != 0:
        return None
    import torch

    return RunInfo(name, ctx.world_size, ctx.tp_size, ctx.pp_size, torch.get_num_threads(), len(todo))


def open_results(cfg: SPDConfig, ctx, name: str) -> tuple[Optional[ResultsFile], set]:
    """Rank 0 opens the JSONL; every rank learns the finished prompt ids, or rank 0's error.

    Raises:
        SPDError: on every rank, when rank 0 cannot resume the file (another setup, no access).
    """
    from spd_megatron.parallel.link import broadcast_from_rank0

    results, state = None, None
    if ctx.rank == 0:
        results = ResultsFile(cfg.eval.out, name)
        try:
            results.open(fingerprint(cfg), session_info(ctx.world_size, ctx.tp_size, ctx.pp_size))
            state = {"done": results.done_ids()}
        except (SPDError, OSError) as err:
            state = {"error": str(err)}
    state = broadcast_from_rank0(state)
    if "error" in state:
        raise SPDError(state["error"])
    return results, state["done"]


def run_hf_eval(cfg: SPDConfig) -> RunInfo:
    """Decode the prompts not yet in the JSONL with Hugging Face generate (one process)."""
    import torch

    from spd_megatron.convert.checkpoint import read_record
    from spd_megatron.engine import load_tokenizer, resolve_checkpoint
    from spd_megatron.eval.hf_generate import load_hf

    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    items = read_prompt_set(cfg.prompts_file, cfg.prompts_limit)
    ckpt = resolve_checkpoint(cfg)  # the same tokenizer and EOS ids as our schedules
    tokenizer, eos = load_tokenizer(ckpt), read_record(ckpt).get("eos_token_ids", ())
    name = config_name(cfg)
    results = ResultsFile(cfg.eval.out, name)
    results.open(fingerprint(cfg), session_info(1, 1, 1))
    todo = [item for item in items if item.id not in results.done_ids()]
    if not todo:
        return RunInfo(name, 1, 1, 1, torch.get_num_threads(), 0)
    model = load_hf(hf_dir(cfg, ckpt), cfg.model.dtype)
    _hf_loop(cfg, model, tokenizer, eos, todo, results)
    return RunInfo(name, 1, 1, 1, torch.get_num_threads(), len(todo))


def _hf_loop(cfg: SPDConfig, model, tokenizer, eos, todo: list[PromptItem], results: ResultsFile) -> None:
    from spd_megatron.eval.hf_generate import hf_generate

    for i, item in enumerate(progress(todo, results.name, True)):
        ids = encode_prompt(tokenizer, item.text, cfg.chat_template, cfg.system_prompt)
        if i == 0:
            warmup = min(WARMUP_TOKENS, cfg.max_new_tokens)
            hf_generate(model, ids, warmup, _hf_generation_config(cfg, model, eos, warmup))
        gen_config = _hf_generation_config(cfg, model, eos, cfg.max_new_tokens)
        stats = hf_generate(model, ids, cfg.max_new_tokens, gen_config, seed=cfg.sampling.seed)
        output_ids = stats.pop("output_ids")
        text = tokenizer.decode(output_ids, skip_special_tokens=True)
        results.append(make_record(results.name, item.id, item.text, output_ids, text, stats))


def _hf_generation_config(cfg: SPDConfig, model, eos, max_new_tokens: int):
    from spd_megatron.eval.hf_generate import generation_config

    s = cfg.sampling
    lookup = cfg.eval.prompt_lookup_num_tokens if cfg.eval.runner == "hf_prompt_lookup" else 0
    return generation_config(model, max_new_tokens, s.temperature, s.top_k, s.top_p, eos, lookup,
                             cfg.eval.prompt_lookup_max_ngram)


def hf_dir(cfg: SPDConfig, ckpt) -> str:
    """eval.hf_dir, else the builtin model's HF folder, else the checkpoint converted back once."""
    if cfg.eval.hf_dir:
        return cfg.eval.hf_dir
    from pathlib import Path

    from spd_megatron.convert.pipeline import hf_folder

    return str(hf_folder(cfg.model, ckpt, Path(cfg.eval.out) / "hf_model"))


def measure(cfg: SPDConfig, ctx=None) -> Optional[RunInfo]:
    """Run the configured runner; the run info on rank 0 (None elsewhere)."""
    from spd_megatron.parallel.init import read_launch_env

    if cfg.eval.runner == "schedule":
        return run_schedule_eval(cfg, ctx)
    if read_launch_env().world_size != 1:
        raise SPDError(f"eval.runner={cfg.eval.runner} runs in one process; launch it with plain python")
    return run_hf_eval(cfg)
