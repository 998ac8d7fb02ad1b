#!/usr/bin/env python
"""Lean vs local layer spec (and compiled) for the PDM step and the training teacher's forward.

    python tools/bench_lean.py [--repeats 7] [--batch 4] [--seq 256] [--compile] [--out DIR]

One process, one thread, SmolLM2-135M-Instruct fp32 (the builtin checkpoint), each variant timed
in interleaved rounds (A B A B ...), median and min of the rounds in ms:
  pdm_step   the PDM's cycle step: R = n + 1 = 3 rows at position 100 over its KV cache (100
             cached rows), layers + final norm + head (n = 2, 1 layer, 8192-token draft vocabulary)
  teacher    the training teacher's batched forward (no KV cache): [batch, seq] ids -> logits
             and anchor taps, as draft/training's Teacher runs it
``--compile`` adds the PDM step through model.compile (inductor; compile time reported).
``--decode N`` instead times greedy decoding in this process, interleaved per round: HF ``generate``
(eager) vs our PP=1 stage (local and lean spec), N new tokens on the same chat prompt, at 1 and 2
threads; decode tok/s per round (best = least disturbed by other processes) and token identity.
Writes a table and <out>/bench_lean.json. Run it under torchrun --nproc-per-node 1 or plainly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29613"), ("RANK", "0"),
                   ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
    os.environ.setdefault(key, value)
REPO = Path(__file__).resolve().parents[1]
ROWS, CACHED = 3, 100


def build(args):
    """Teachers and PDMs per spec: {name: (teacher stage, pdm module)}."""
    import torch

    from spd_megatron.config import load_config
    from spd_megatron.convert.checkpoint import read_arch
    from spd_megatron.draft.pdm import PDMConfig, PipelineDraftModule
    from spd_megatron.engine import build_stage, resolve_checkpoint
    from spd_megatron.parallel.init import init_parallel

    cfg = load_config("default", [f"model.max_seq_len={max(args.seq, 512)}"])
    ctx = init_parallel(cfg.parallel)
    ckpt = resolve_checkpoint(cfg)
    arch = read_arch(ckpt)
    half = arch.num_layers // 2
    pdm_cfg = PDMConfig([half, arch.num_layers - half], [0, half, arch.num_layers], 1, list(range(8192)))
    out = {}
    for spec in ("local", "lean"):
        cfg.model.layer_spec = spec
        teacher = build_stage(cfg, ctx, ckpt, arch)
        teacher.set_taps(pdm_cfg.anchors)
        torch.manual_seed(0)
        out[spec] = (teacher, PipelineDraftModule(pdm_cfg, arch, max_seq_len=512, layer_spec=spec).eval())
    return out


def pdm_step(module, rows, graphs=None):
    """One cycle step: R rows at CACHED over the cache, then truncate back (as PDMDraft does)."""
    logits = graphs.step(rows, CACHED) if graphs is not None else None
    if logits is None:
        logits = module.logits(module(rows, CACHED)[-1, 0]).float()
    module.cache.truncate(CACHED)
    return logits


def teacher_forward(stage, ids, mask):
    logits = stage.model(ids, None, mask, runtime_gather_output=True)  # [B, S, V]
    return logits, dict(stage.taps)


def timed(fn, repeats_inner: int) -> float:
    begin = time.perf_counter()
    for _ in range(repeats_inner):
        fn()
    return 1000 * (time.perf_counter() - begin) / repeats_inner


def run(args) -> dict:
    import torch

    from spd_megatron.target.kv_cache import causal_mask

    torch.set_num_threads(1)
    variants = build(args)
    h = next(iter(variants.values()))[1].arch.hidden_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40000, (args.batch, args.seq), generator=gen)  # [B, S]
    mask = causal_mask(0, args.seq)
    fns, compile_s, outputs = {}, {}, {}
    with torch.inference_mode():
        prompt_rows = torch.randn(CACHED, 1, h, generator=gen)
        rows = torch.randn(ROWS, 1, h, generator=gen)  # [R, 1, h]
        for spec, (teacher, pdm) in variants.items():
            pdm(prompt_rows, 0)
            fns[f"pdm_step_{spec}"] = (lambda p=pdm: pdm_step(p, rows), 20)
            fns[f"teacher_{spec}"] = (lambda t=teacher: teacher_forward(t, ids, mask), 1)
        if args.compile:
            from spd_megatron.target.compiled import CompiledPDMStep, inductor_cache_dir

            inductor_cache_dir(Path(args.out) / "cache")
            pdm = variants["lean"][1]
            pdm.cache.truncate(0)
            begin = time.perf_counter()
            graphs = CompiledPDMStep(pdm)
            compile_s["pdm_step_lean_compiled"] = time.perf_counter() - begin
            pdm(prompt_rows, 0)
            fns["pdm_step_lean_compiled"] = (lambda: pdm_step(pdm, rows, graphs), 20)
        for name, (fn, _) in fns.items():
            outputs[name] = fn()[0].float()  # warm-up, and the output to compare
        samples = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, (fn, inner) in fns.items():
                samples[name].append(timed(fn, inner))
    ref = {"pdm": outputs["pdm_step_local"], "teacher": outputs["teacher_local"]}
    return {"args": vars(args), "load_avg": os.getloadavg(), "compile_seconds": compile_s, "samples_ms": samples,
            "median_ms": {n: statistics.median(s) for n, s in samples.items()},
            "min_ms": {n: min(s) for n, s in samples.items()},
            "max_abs_diff_vs_local": {n: float((o - ref[n.split("_")[0]]).abs().max()) for n, o in outputs.items()}}


def our_greedy(stage, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Prefill, then greedy one-token steps; (decode tok/s after the first token, new ids)."""
    import torch

    logits = stage.forward(0, token_ids=torch.tensor([ids]))[0, -1]
    out = [int(logits.argmax())]
    begin = time.perf_counter()
    for i in range(new_tokens - 1):
        logits = stage.forward(len(ids) + i, token_ids=torch.tensor([[out[-1]]]))[0, -1]
        out.append(int(logits.argmax()))
    return (new_tokens - 1) / (time.perf_counter() - begin), out


def run_decode(args) -> dict:
    """HF generate vs our stage (local, lean), interleaved rounds at 1 and 2 threads."""
    import torch
    from transformers import AutoTokenizer

    from spd_megatron.eval.hf_generate import generation_config, hf_generate, load_hf
    from spd_megatron.eval.prompts import encode_prompt, read_prompts_file

    stages = {spec: teacher for spec, (teacher, _) in build(args).items()}
    for stage in stages.values():
        stage.set_taps(())
    hf_dir = str(Path.home() / ".cache" / "spd_megatron" / "hf" / "smollm2-135m-instruct")
    model = load_hf(hf_dir)
    gen = generation_config(model, args.decode)
    ids = encode_prompt(AutoTokenizer.from_pretrained(hf_dir), read_prompts_file("mt_bench", 1)[0])
    rates, same = {}, {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                hf = hf_generate(model, ids, args.decode, gen)
                rates.setdefault(f"hf_t{threads}", []).append(hf["decode_tokens_per_s"])
                for spec, stage in stages.items():
                    rate, out = our_greedy(stage, ids, len(hf["output_ids"]))  # as many as HF (EOS)
                    rates.setdefault(f"ours_{spec}_t{threads}", []).append(rate)
                    same[f"ours_{spec}_t{threads}"] = out == hf["output_ids"]
    best = {n: max(r) for n, r in rates.items()}
    return {"args": vars(args), "load_avg": os.getloadavg(), "prompt_tokens": len(ids), "tok_s": rates,
            "best_tok_s": best, "median_tok_s": {n: statistics.median(r) for n, r in rates.items()},
            "identical_to_hf": same,
            "best_vs_hf_same_threads": {n: best[n] / best[f"hf_{n[-2:]}"] for n in best if n.startswith("ours")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--batch", type=int, default=4, help="teacher batch (conversations)")
    p.add_argument("--seq", type=int, default=256, help="teacher sequence length")
    p.add_argument("--compile", action="store_true", help="also the compiled PDM step (inductor)")
    p.add_argument("--decode", type=int, default=0, help="time greedy decoding of N tokens instead")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_lean"))
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.decode:
        result = run_decode(args)
        (Path(args.out) / "bench_lean_decode.json").write_text(json.dumps(result, indent=1))
        for name, rates in result["tok_s"].items():
            print(f"{name:18s} best {max(rates):6.2f} median {statistics.median(rates):6.2f} tok/s  "
                  f"vs HF {result['best_vs_hf_same_threads'].get(name, 1.0):.2f}  "
                  f"same tokens {result['identical_to_hf'].get(name, '-')}")
        return 0
    result = run(args)
    (Path(args.out) / "bench_lean.json").write_text(json.dumps(result, indent=1))
    for name in result["median_ms"]:
        print(f"{name:26s} median {result['median_ms'][name]:9.2f} ms  min {result['min_ms'][name]:9.2f} ms  "
              f"max|diff| vs local {result['max_abs_diff_vs_local'][name]:.2e}")
    print(f"compile seconds: {result['compile_seconds']}; load avg {result['load_avg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
