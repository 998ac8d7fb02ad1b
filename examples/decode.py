#!/usr/bin/env python
"""Decode prompts with a pipeline-parallel target on Megatron-core.

    torchrun --nproc-per-node N examples/decode.py [--config NAME|PATH] [key=value ...]

With no arguments: the builtin SmolLM2-135M-Instruct (converted on first use), a builtin chat
prompt, one pipeline stage per process. Keys: see spd_megatron/config.py, e.g. prompt="...",
prompts_file=PATH prompts_limit=K, max_new_tokens=64, schedule.name=autoregressive,
sampling.temperature=0.7, parallel.tensor_parallel_size=2, model.checkpoint=DIR,
model.dtype=bfloat16, report.json=out.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset name (spd_megatron/configs) or YAML path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def collect_prompts(cfg) -> list[str]:
    from spd_megatron.eval.prompts import DEFAULT_PROMPT, read_prompts_file

    if cfg.prompts_file:
        return read_prompts_file(cfg.prompts_file, cfg.prompts_limit)
    return [cfg.prompt or DEFAULT_PROMPT]


def decode_all(engine, prompts: list[str]) -> list[dict]:
    """Run every prompt; returns the report records (complete on rank 0)."""
    from spd_megatron.eval.prompts import encode_prompt
    from spd_megatron.report import TextStreamer, result_record

    cfg, tok, is_rank0 = engine.cfg, engine.tokenizer, engine.ctx.rank == 0
    records = []
    for text in prompts:
        ids = encode_prompt(tok, text, cfg.chat_template, cfg.system_prompt)
        streamer = TextStreamer(tok) if is_rank0 and cfg.report.stream else None
        if streamer:
            print(f"\n>>> {text}\n", flush=True)
        result = engine.schedule.generate(ids, cfg.max_new_tokens, engine.eos_token_ids, on_token=streamer)
        if streamer:
            streamer.end()
        out_text = tok.decode(result.output_ids, skip_special_tokens=True)
        records.append(result_record(text, ids, result.output_ids, out_text, result.stats))
    return records


def run(cfg) -> None:
    from spd_megatron.engine import build_engine
    from spd_megatron.report import print_stats_table, summarize, write_report

    engine = build_engine(cfg)
    records = decode_all(engine, collect_prompts(cfg))
    if engine.ctx.rank != 0:
        return
    title = (f"{cfg.schedule.name} | TP={engine.ctx.tp_size} PP={engine.ctx.pp_size} | "
             f"{engine.checkpoint.name} {cfg.model.dtype}")
    print_stats_table(records, title)
    if cfg.report.json:
        write_report(cfg.report.json, dataclasses.asdict(cfg), records, summarize(records))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from spd_megatron.errors import SPDError
    from spd_megatron.parallel.init import read_launch_env, shutdown_parallel
    from spd_megatron.parallel.link import report_failure

    rank = read_launch_env().rank
    try:
        from spd_megatron.config import load_config

        run(load_config(args.config, args.overrides))
    except SPDError as err:
        report_failure(rank, str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: show it, and tell the other ranks
        report_failure(rank, f"{type(err).__name__}: {err}")
        traceback.print_exc()
        return 1
    finally:
        shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
