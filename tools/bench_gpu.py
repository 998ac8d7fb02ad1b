#!/usr/bin/env python
"""GPU benchmark of issue 6: step times and SPD vs autoregressive on one GPU.

    python tools/bench_gpu.py --out runs/gpu_check            # on a CUDA machine (tools/gpu_check.sh)
    python tools/bench_gpu.py --out /tmp/b --smoke            # CPU: the script's logic on a tiny model

A random Llama-shaped model (no download; default 8 layers, h=1024, GQA 16/4, vocab 32000, bf16)
is converted once into the output folder. Measured:

- ``steps``: one-token decode step of one stage holding all layers (PP=1), ms per step after a
  32-token prefill: local spec eager and CUDA graph; TE spec eager, CUDA graph, and FP8 eager
  (TE rows only where Transformer Engine imports; FP8 only on compute capability 8.9+).
- ``pdm``: one steady-state PDM step (3 rows for n = 2, one layer, greedy choice), ms per step:
  eager and as CUDA graphs (``draft.cuda_graphs``).
- ``decode``: PP=2, both stages as processes sharing the GPU (gloo p2p through host memory):
  autoregressive vs SPD with an oracle draft (the ceiling: every draft right) and with a random
  PDM (the real draft's cost, acceptance ~0), eager and with CUDA graphs (stage steps and the
  PDM step); decode tokens/s. Headers use the pre-posted control channel (the default).

Writes OUT/bench_gpu.json. ``--worker`` is the torchrun side of ``decode``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_models (random HF models) and helpers
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)


def make_model(out: Path, smoke: bool) -> Path:
    """The benchmark checkpoint (random weights, std 0.02), converted once."""
    from tiny_models import make_tiny_hf

    from spd_megatron.convert.pipeline import convert_hf_to_checkpoint

    dtype = "float32" if smoke else "bfloat16"
    ckpt = out / f"model-{'smoke' if smoke else 'bench'}-{dtype}"
    if not (ckpt / "spd_checkpoint.json").exists():
        hf = make_tiny_hf("llama", out / "model-hf", std=0.02, **(SMOKE_MODEL if smoke else MODEL))
        convert_hf_to_checkpoint(hf, ckpt, dtype, show_progress=False)
    return ckpt


def config(ckpt: Path, **overrides):
    from helpers import tiny_config

    cfg = tiny_config(ckpt, **overrides)
    cfg.model.max_seq_len = 512
    cfg.model.dtype = json.loads((ckpt / "spd_checkpoint.json").read_text())["dtype"]
    cfg.schedule.prefill_chunk_size = 0
    return cfg


# ---- step times (this process, PP=1) ----------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(stage, steps: int) -> float:
    """ms per one-token step after a 32-token prefill (warm-up steps not timed)."""
    import torch

    ids = torch.arange(32).view(1, 32) % stage.arch.vocab_size
    with torch.inference_mode():
        stage.forward(0, token_ids=ids)
        for i in range(5):  # warm-up (captures the graph on the first step)
            stage.forward(32 + i, token_ids=ids[:, :1])
        sync()
        start = time.perf_counter()
        for i in range(steps):
            stage.forward(37 + i, token_ids=ids[:, i % 32:i % 32 + 1])
        sync()
    return 1000 * (time.perf_counter() - start) / steps


def step_rows(ckpt: Path, steps: int, cuda: bool) -> dict:
    import torch

    from spd_megatron.engine import build_engine
    from spd_megatron.parallel.init import init_parallel
    from spd_megatron.target.specs import transformer_engine_available

    rows = [("local", False, False), ("local", True, False)]
    if cuda and transformer_engine_available():
        rows += [("transformer_engine", False, False), ("transformer_engine", True, False)]
        if torch.cuda.get_device_capability() >= (8, 9):
            rows.append(("transformer_engine", False, True))
    out = {}
    for spec, graphs, fp8 in rows:
        if graphs and not cuda:
            continue
        name = f"{spec}{'_fp8' if fp8 else ''}_{'graph' if graphs else 'eager'}"
        cfg = config(ckpt, model__layer_spec=spec, model__cuda_graphs=graphs, model__fp8=fp8)
        try:
            engine = build_engine(cfg, init_parallel(cfg.parallel))
            out[name] = {"ms_per_step": time_steps(engine.stage, steps)}
            graph_state = engine.stage.decode_graphs
            if graphs:
                out[name]["graph_fallback"] = graph_state.disabled if graph_state else "not enabled"
        except Exception as err:  # noqa: BLE001 - record and go on with the other rows
            out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(name, out[name], flush=True)
    return out


def time_pdm(draft, steps: int) -> float:
    """ms per steady-state PDM step (rows at depths 2, 1, 0) after 32 prompt rows."""
    import torch

    from spd_megatron.draft.base import DraftContext, DraftRow
    from spd_megatron.sampling.logits import SamplingParams

    module = draft.module
    h, device = module.arch.hidden_size, module.head.weight.device
    feats = {k: torch.randn(h, device=device) for k in module.cfg.anchors}
    draft.start([DraftRow(p, 0, 2, feats) for p in range(32)])
    greedy, gen = SamplingParams(), torch.Generator()

    def step():
        start = module.cache.length
        rows = [DraftRow(start + i, 0, 2 - i, feats) for i in range(3)]
        draft.propose(DraftContext(start + 3, [0] * (start + 3), rows, start + 1), greedy, gen)

    with torch.inference_mode():
        for _ in range(5):  # warm-up (captures on the first step)
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
    return 1000 * (time.perf_counter() - t0) / steps


def pdm_rows(ckpt: Path, steps: int, cuda: bool) -> dict:
    from spd_megatron.draft.cuda_graphs import make_pdm_graphs
    from spd_megatron.draft.pdm import PDMDraft
    from spd_megatron.engine import build_engine, load_pdm, pdm_config
    from spd_megatron.parallel.init import init_parallel

    cfg = config(ckpt)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    split = [engine.arch.num_layers // 2, engine.arch.num_layers - engine.arch.num_layers // 2]
    module = load_pdm(cfg, engine.checkpoint, pdm_config(cfg, engine.arch, split), engine.arch, engine.ctx)
    out = {}
    for graphs in ([False, True] if cuda else [False]):
        name = f"pdm_{'graph' if graphs else 'eager'}"
        try:
            draft = PDMDraft(module, make_pdm_graphs(module, 1, "nccl") if graphs else None)
            out[name] = {"ms_per_step": time_pdm(draft, steps)}
            if graphs:
                out[name]["graph_fallback"] = draft.graphs.disabled if draft.graphs else "not enabled"
        except Exception as err:  # noqa: BLE001 - record and go on
            out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(name, out[name], flush=True)
    return out


# ---- SPD vs autoregressive (torchrun, PP=2 on one GPU) --------------------------------------
def worker(args) -> None:
    import torch

    from spd_megatron.draft import OracleDraft
    from spd_megatron.draft.cuda_graphs import make_pdm_graphs
    from spd_megatron.engine import build_engine, build_schedule
    from spd_megatron.parallel.link import gather_to_rank0
    from spd_megatron.schedule.spd import SPDSchedule
    from spd_megatron.target.cuda_graphs import make_decode_graphs

    cfg = config(Path(args.ckpt))
    engine = build_engine(cfg)
    first = engine.stage.placement.is_first
    prompt = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    cfg.schedule.name = "spd"
    pdm = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
    records = []
    for graphs in ([False, True] if torch.cuda.is_available() else [False]):
        engine.stage.decode_graphs = make_decode_graphs(engine.stage, 1, "gloo") if graphs else None
        if pdm.draft is not None:
            pdm.draft.graphs = make_pdm_graphs(pdm.draft.module, 1, "gloo") if graphs else None
        ref = engine.schedule.generate(prompt, args.new_tokens)  # also the warm-up / capture
        oracle = OracleDraft(prompt + ref.output_ids, engine.arch.vocab_size) if first else None
        spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=oracle)
        for rep in range(args.repeats):
            for name, sched in (("ar", engine.schedule), ("spd_oracle", spd), ("spd_pdm", pdm)):
                result = sched.generate(prompt, args.new_tokens)
                same = result.output_ids == ref.output_ids if first else None
                records.append(dict(name=name, graphs=graphs, rep=rep, same_as_ar=same,
                                    **result.stats.to_dict()))
    gathered = gather_to_rank0(records)
    if engine.ctx.rank == 0:
        Path(args.worker_out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def decode_rows(ckpt: Path, out: Path, args) -> dict:
    worker_out = out / "worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, "--worker", "--ckpt", str(ckpt), "--worker-out", str(worker_out),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    rank0 = json.loads(worker_out.read_text())[0]
    rows = {}
    for rec in rank0:
        key = f"{rec['name']}_{'graph' if rec['graphs'] else 'eager'}"
        rows.setdefault(key, []).append(rec)
    return {key: summarize(recs) for key, recs in rows.items()}


def summarize(recs: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] - 1 for r in recs)
    seconds = sum(r["decode_seconds"] for r in recs)
    cycles = sum(r["cycles"] for r in recs)
    return {"decode_tokens_per_s": tokens / seconds, "tokens_per_cycle": tokens / cycles,
            "acceptance_rate": sum(r["accepted"] for r in recs) / max(sum(r["verified"] for r in recs), 1),
            "ms_per_cycle": 1000 * seconds / cycles, "same_output_as_ar": all(r["same_as_ar"] for r in recs),
            "runs": len(recs)}


def environment() -> dict:
    import torch

    from spd_megatron.target.specs import transformer_engine_available

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "transformer_engine": None}
    if torch.cuda.is_available() and transformer_engine_available():
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "?")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 model, few steps (CPU allowed)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--ckpt")
    p.add_argument("--worker-out")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --smoke for a CPU check of the script)")
    if args.smoke:
        args.steps, args.new_tokens, args.repeats = 10, 8, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = make_model(out, args.smoke)
    result = {"env": environment(), "model": SMOKE_MODEL if args.smoke else MODEL, "args": vars(args)}
    sections = (("decode", lambda: decode_rows(ckpt, out, args)),  # before this process touches the GPU
                ("steps", lambda: step_rows(ckpt, args.steps, cuda)),
                ("pdm", lambda: pdm_rows(ckpt, args.steps, cuda)))
    for name, measure in sections:  # the JSON is rewritten after each: a cut run keeps what it measured
        result[name] = measure()
        (out / "bench_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
