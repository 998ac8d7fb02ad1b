#!/usr/bin/env python
"""Time to first token and decode tok/s through the server vs examples/decode.py, same prompts.

    python tools/bench_serve.py [--nproc 2] [--prompts 5] [--max-tokens 64] [--out bench_serve.json] \
        [key=value ...]          # config overrides for both, e.g. schedule.name=spd

decode.py runs once over every prompt (its per-prompt prefill seconds and decode tok/s come from
its JSON report; its wall time includes the start: imports, process groups, model load). Then the
server starts with the same config, and each prompt is sent as a streamed chat completion, one
at a time; the client measures the time to the first token (the first chunk with text) and the
decode rate after it. Greedy outputs are compared. Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port())]


def run_decode_py(args, prompts_file: Path, report: Path) -> tuple[list[dict], float]:
    cmd = torchrun(args.nproc) + [str(ROOT / "examples" / "decode.py"), f"prompts_file={prompts_file}",
                                  f"max_new_tokens={args.max_tokens}", f"report.json={report}",
                                  "report.stream=false", *args.overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=args.timeout, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads(report.read_text())["results"], wall


def start_server(args, port: int, log) -> tuple[subprocess.Popen, float]:
    import httpx

    cmd = torchrun(args.nproc) + ["-m", "spd_megatron.serve", f"serve.port={port}",
                                  "serve.model_name=bench", *args.overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.HTTPError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the server did not start within {args.timeout:.0f} s; see {log.name}")


def ask(client, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion, timed on the client."""
    start = time.perf_counter()
    first, last, parts, tokens = 0.0, 0.0, [], 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is None or delta.role or delta.content is None:  # the role chunk, the final one
            continue
        last = time.perf_counter()  # a token's chunk
        first = first or last
        parts.append(delta.content)
    decode_s = last - first
    return {"ttft_s": first - start, "tokens": tokens, "text": "".join(parts),
            "decode_tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 else 0.0}


def serve_side(args, prompts: list[str], log) -> tuple[list[dict], float]:
    import openai

    port = free_port()
    proc, startup = start_server(args, port, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                               timeout=args.timeout)
        ask(client, prompts[0], 4)  # warm-up (first-call allocations), not measured
        return [ask(client, p, args.max_tokens) for p in prompts], startup
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def table(rows: list[dict]) -> str:
    head = f"{'#':>2} {'tok':>4} {'TTFT decode.py s':>17} {'TTFT server s':>14} {'tok/s decode.py':>16} " \
           f"{'tok/s server':>13} {'same text':>9}"
    lines = [head]
    for i, r in enumerate(rows):
        lines.append(f"{i:>2} {r['tokens']:>4} {r['decode_py_ttft_s']:>17.3f} {r['server_ttft_s']:>14.3f} "
                     f"{r['decode_py_tokens_per_s']:>16.1f} {r['server_tokens_per_s']:>13.1f} {str(r['same_text']):>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from spd_megatron.eval.prompts import read_prompts_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=5, help="first K prompts of --prompts-file")
    parser.add_argument("--prompts-file", default="mt_bench")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="bench_serve.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for decode.py and the server")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    prompts = read_prompts_file(args.prompts_file, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in prompts))
        direct, decode_wall = run_decode_py(args, prompts_file, Path(tmp) / "report.json")
        with open(Path(tmp) / "server.log", "w") as log:
            served, startup = serve_side(args, prompts, log)
    rows = [{"prompt": p, "tokens": s["tokens"], "decode_py_ttft_s": d["stats"]["prefill_seconds"],
             "server_ttft_s": s["ttft_s"], "decode_py_tokens_per_s": d["stats"]["decode_tokens_per_s"],
             "server_tokens_per_s": s["decode_tokens_per_s"], "same_text": s["text"] == d["text"]}
            for p, d, s in zip(prompts, direct, served)]
    print(table(rows))
    n = len(rows)
    summary = {"decode_py_wall_s": decode_wall, "server_startup_s": startup,
               "mean_ttft_decode_py_s": sum(r["decode_py_ttft_s"] for r in rows) / n,
               "mean_ttft_server_s": sum(r["server_ttft_s"] for r in rows) / n,
               "mean_tokens_per_s_decode_py": sum(r["decode_py_tokens_per_s"] for r in rows) / n,
               "mean_tokens_per_s_server": sum(r["server_tokens_per_s"] for r in rows) / n}
    print(f"decode.py wall (start + {n} prompts): {decode_wall:.1f} s; server start: {startup:.1f} s; "
          f"mean TTFT decode.py (in-process prefill) {summary['mean_ttft_decode_py_s']:.3f} s vs server "
          f"(client-side) {summary['mean_ttft_server_s']:.3f} s; decode tok/s "
          f"{summary['mean_tokens_per_s_decode_py']:.1f} vs {summary['mean_tokens_per_s_server']:.1f}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
