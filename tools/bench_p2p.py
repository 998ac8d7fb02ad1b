#!/usr/bin/env python
"""p2p latency of one pipeline hop through StageLink, on two gloo ranks (torchrun, CPU).

    python tools/bench_p2p.py [--iters 2000] [--hidden 576] [--out runs/bench_p2p]

Modes, each timed over ``iters`` round trips after 100 warm-up ones (one-way = round trip / 2):
  stagelink_sym      header + [1, 1, h] from rank 0 to 1 and the same back (send_next / recv_prev)
  stagelink_ring     the PP=2 decode pattern: header + hidden 0 -> 1, then a TOKEN header 1 -> 0
  stagelink_prepost  the ring pattern with pre-posted receives (``parallel.prepost_receives``):
                     headers on the gloo control channel, the next hidden row posted ahead
  raw_send_recv      plain blocking dist.send / dist.recv of the same tensors, both ways
Prints a table and writes OUT/bench_p2p.json. ``--worker`` is the torchrun side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("stagelink_sym", "stagelink_ring", "stagelink_prepost", "raw_send_recv")  # prepost before raw: see worker


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_summary(rtt_seconds: list[float]) -> dict:
    """One-way latency (RTT / 2) percentiles in microseconds."""
    one_way = [1e6 * r / 2 for r in rtt_seconds]
    median = percentile(one_way, 50)
    return {"n": len(one_way), "one_way_us_median": median, "one_way_us_p90": percentile(one_way, 90),
            "one_way_us_p99": percentile(one_way, 99), "rtt_us_median": 2 * median}


# ---- the torchrun worker ----------------------------------------------------------------------
def _links(rank: int, hidden: int, control_group) -> dict:
    """StageLinks of a 2-stage ring: both directions (sym), decode's ring, the ring pre-posted."""
    import torch

    from spd_megatron.parallel.link import StageLink

    prev_rank, next_rank = (None, 1) if rank == 0 else (0, None)
    ring = dict(rank=rank, prev_rank=prev_rank, next_rank=next_rank, first_rank=0, last_rank=1,
                hidden_size=hidden, dtype=torch.float32, timeout_s=60)
    return {"stagelink_sym": StageLink(rank, 1 - rank, 1 - rank, 0, 1, hidden, torch.float32, timeout_s=60),
            "stagelink_ring": StageLink(**ring),
            "stagelink_prepost": StageLink(**ring, control_group=control_group)}


def _round_trip(mode: str, rank: int, links: dict, payload) -> None:
    """One round trip rank 0 -> 1 -> 0: header + [1, 1, h] out, and back as ``mode`` says."""
    from spd_megatron.parallel.link import Header, Op

    header = Header(Op.STEP, 7, 1, -1)
    if mode == "raw_send_recv":
        return _raw_round_trip(rank, header.to_tensor(), payload)
    link, ring = links[mode], mode != "stagelink_sym"
    if rank == 1:
        link.recv_hidden(link.recv_prev().count)
    if ring and rank == 1:
        link.send_to_first(Header(Op.TOKEN, 8, 0, 42))  # the feedback edge: header only
    else:
        link.send_next(header, payload)
    link.flush()
    if rank == 0 and ring:
        link.recv_from_last()
    elif rank == 0:
        link.recv_hidden(link.recv_prev().count)


def _raw_round_trip(rank: int, header, payload) -> None:
    """Plain blocking dist.send/recv of the header and the hidden, both ways."""
    import torch.distributed as dist

    for src, dst in ((0, 1), (1, 0)):
        for tensor in (header, payload):
            dist.send(tensor, dst) if rank == src else dist.recv(tensor, src)


def _end_ring(rank: int, link) -> None:
    """STOP on the ring: the pre-posted row receive is not renewed, nothing stays pending."""
    from spd_megatron.parallel.link import Header, Op

    if rank == 0:
        link.send_next(Header(Op.STOP))
        link.flush()
    else:
        link.recv_prev()


def worker(iters: int, hidden: int, out: str) -> int:
    """Time ``iters`` round trips per mode on 2 gloo ranks; rank 0 writes the RTTs (seconds)."""
    import torch
    import torch.distributed as dist

    from spd_megatron.config import ParallelConfig
    from spd_megatron.parallel.init import init_parallel

    ctx = init_parallel(ParallelConfig(pipeline_parallel_size=2, backend="gloo"))
    rank = ctx.rank
    links, payload = _links(rank, hidden, ctx.claim_control_group()), torch.randn(1, 1, hidden)  # [1, 1, h]
    rtts = {}
    for mode in MODES:
        for _ in range(100):  # warm-up
            _round_trip(mode, rank, links, payload)
        dist.barrier()
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            _round_trip(mode, rank, links, payload)
            samples.append(time.perf_counter() - t0)
        rtts[mode] = samples
        if mode == "stagelink_prepost":
            _end_ring(rank, links[mode])  # else its posted row would take raw_send_recv's first tensor
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(rtts))
    dist.destroy_process_group()
    return 0


# ---- the launcher -------------------------------------------------------------------------------
def run(iters: int, hidden: int, out_dir: Path, log_file: Path | None = None) -> dict:
    """Launch the 2-rank worker with torchrun; the round-trip times per mode (seconds)."""
    out = out_dir / "pingpong.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), "--worker", "--iters", str(iters), "--hidden", str(hidden),
           "--worker-out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench_p2p worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def print_table(summary: dict, hidden: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"p2p latency, 2 gloo ranks, [1,1,{hidden}] fp32 + 5-int64 header")
    for col in ("mode", "one-way median µs", "p90 µs", "p99 µs", "n"):
        table.add_column(col, justify="right")
    for mode, s in summary.items():
        table.add_row(mode, f"{s['one_way_us_median']:.0f}", f"{s['one_way_us_p90']:.0f}",
                      f"{s['one_way_us_p99']:.0f}", str(s["n"]))
    Console(width=120).print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="timed round trips per mode")
    p.add_argument("--hidden", type=int, default=576, help="hidden size of the payload (SmolLM2-135M: 576)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_p2p"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.iters, args.hidden, args.worker_out)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rtts = run(args.iters, args.hidden, out_dir, out_dir / "worker.log")
    summary = {mode: latency_summary(samples) for mode, samples in rtts.items()}
    (out_dir / "bench_p2p.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
    print_table(summary, args.hidden)
    print(f"wrote {out_dir / 'bench_p2p.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
