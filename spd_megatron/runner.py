"""The decode job behind examples/decode.py: prompts in, streamed text, stats table and report out."""

from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from typing import Optional, Sequence

from spd_megatron.config import SPDConfig, load_config
from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)


def collect_prompts(cfg: SPDConfig) -> list[str]:
    from spd_megatron.eval.prompts import DEFAULT_PROMPT, read_prompts_file

    if cfg.prompts_file:
        return read_prompts_file(cfg.prompts_file, cfg.prompts_limit)
    return [cfg.prompt or DEFAULT_PROMPT]


def decode_prompts(engine, prompts: list[str]) -> list[dict]:
    """Run every prompt on every rank; the returned report records are complete on rank 0."""
    from spd_megatron.eval.prompts import encode_prompt
    from spd_megatron.report import TextStreamer, result_record

    cfg, tok = engine.cfg, engine.tokenizer
    records = []
    for text in prompts:
        ids = encode_prompt(tok, text, cfg.chat_template, cfg.system_prompt)
        streamer = TextStreamer(tok) if engine.ctx.rank == 0 and cfg.report.stream else None
        if streamer:
            print(f"\n>>> {text}\n", flush=True)
        result = engine.schedule.generate(ids, cfg.max_new_tokens, engine.eos_token_ids, on_token=streamer)
        if streamer:
            streamer.end()
        out_text = tok.decode(result.output_ids, skip_special_tokens=True)
        records.append(result_record(text, ids, result.output_ids, out_text, result.stats))
    return records


def run_decode(cfg: SPDConfig, ctx=None) -> Optional[list[dict]]:
    """Build the engine, decode the configured prompts; rank 0 prints the table and writes JSON."""
    from spd_megatron.engine import build_engine
    from spd_megatron.report import print_stats_table, summarize, write_report

    prompts = collect_prompts(cfg)  # bad prompt files fail before any model work
    engine = build_engine(cfg, ctx)
    records = decode_prompts(engine, prompts)
    if engine.ctx.rank != 0:
        return None
    title = (f"{cfg.schedule.name} | TP={engine.ctx.tp_size} PP={engine.ctx.pp_size} | "
             f"{engine.checkpoint.name} {cfg.model.dtype}")
    print_stats_table(records, title)
    if cfg.report.json:
        write_report(cfg.report.json, dataclasses.asdict(cfg), records, summarize(records))
    return records


def main(argv: Optional[Sequence[str]] = None, config: str = "default", job=None, prog: str = "decode.py") -> int:
    """CLI: ``[--config NAME|PATH] [--verbose] [key=value ...]``. Exit 0, 2 (bad input) or 1 (bug).

    ``job(cfg)`` runs on every rank (default: run_decode); tools/eval.py passes its own.
    """
    import argparse

    from spd_megatron.console import configure_output, level_from_argv

    parser = argparse.ArgumentParser(prog=prog, description="See README.md and spd_megatron/config.py.")
    parser.add_argument("--config", default=config, help="preset name (spd_megatron/configs) or YAML path")
    parser.add_argument("--verbose", action="store_true", help="log_level=info: show every log line and warning")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    configure_output(level_from_argv(args.overrides, args.verbose))  # before megatron is imported

    from spd_megatron.parallel.init import read_launch_env, shutdown_parallel
    from spd_megatron.parallel.link import report_failure

    rank = read_launch_env().rank
    try:
        cfg = load_config(args.config, [*args.overrides, *(["log_level=info"] if args.verbose else [])])
        configure_output(cfg.log_level)
        (job or run_decode)(cfg)
    except SPDError as err:
        report_failure(rank, str(err))
        print_error_once(rank, str(err))
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: show it, and tell the other ranks
        report_failure(rank, f"{type(err).__name__}: {err}")
        traceback.print_exc()
        return 1
    finally:
        shutdown_parallel()
    return 0


ERROR_GRACE_S = 5.0  # how long a non-zero rank waits for rank 0 to print the error instead


def print_error_once(rank: int, message: str) -> None:
    """``error: message`` on rank 0; another rank prints only if rank 0 has not within the grace.

    Every rank usually hits the same bad input; rank 0 says so. A rank that failed alone still
    speaks: rank 0 is then either printing the failure it learnt of (and says it did), or it is
    busy, and the grace runs out. The launcher stops the other ranks once one exits, so waiting
    here never hides rank 0's line.
    """
    from spd_megatron.parallel.link import error_shown_by_rank0, mark_error_shown

    if rank != 0 and error_shown_by_rank0(ERROR_GRACE_S):
        return
    print(f"error: {message}", file=sys.stderr, flush=True)
    if rank == 0:
        mark_error_shown()
