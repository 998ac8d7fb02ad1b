"""tools/eval.py's job: measure the configured run, then the baselines, then summarize and plot.

The configured run (any schedule, draft, TP x PP) runs in the launcher's processes. Each baseline
then runs as its own subprocess on rank 0, one after the other, so none competes with another
for the cores: ``python -m spd_megatron.eval`` (one process: ar_pp1, hf_generate,
hf_prompt_lookup) or ``torchrun -m spd_megatron.eval`` (ar_same_pp). Each gets the fully
resolved config as a file, writes its own JSONL under eval.out (so each resumes on its own), has
a timeout, and a failure is reported in one line (and in summary.json's ``errors``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from spd_megatron.config import DraftConfig, SPDConfig
from spd_megatron.errors import SPDError
from spd_megatron.eval.measure import RunInfo, hf_dir, measure
from spd_megatron.eval.records import ResultsFile

log = logging.getLogger(__name__)

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "ROLE_NAME", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_")
KILL_GRACE_S = 10.0


def baseline_config(cfg: SPDConfig, name: str, info: RunInfo, threads: int) -> SPDConfig:
    """The resolved config of one baseline: same prompts, tokens, sampling and model as ``cfg``."""
    out = copy.deepcopy(cfg)
    out.schedule.name, out.draft = "autoregressive", DraftConfig()
    out.eval = dataclasses.replace(cfg.eval, name=name, baselines=[], is_worker=True, threads=threads,
                                   runner=name if name.startswith("hf_") else "schedule")
    same_pp = name == "ar_same_pp"
    out.parallel.tensor_parallel_size = info.tensor_parallel_size if same_pp else 1
    out.parallel.pipeline_parallel_size = info.pipeline_parallel_size if same_pp else 1
    out.parallel.layers_per_stage = list(cfg.parallel.layers_per_stage) if same_pp else []
    out.parallel.threads_per_rank = threads  # the rule of parallel/threads.py, as OMP_NUM_THREADS says
    return out


def write_config(cfg: SPDConfig, path: Path) -> Path:
    """The config as a preset file for ``--config`` (JSON, which YAML reads as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return path


def child_env(threads: int) -> dict:
    """This environment without the launcher's rank variables, with the thread count set."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_PREFIXES)}
    return dict(env, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def launch_command(nproc: int, config_path: Path) -> list[str]:
    entry = ["-m", "spd_megatron.eval", "--config", str(config_path)]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *entry]


def run_subprocess(name: str, cmd: list[str], log_path: Path, timeout_s: float, env: dict,
                   timeout_knob: str = "eval.timeout_s") -> Optional[str]:
    """Run ``cmd`` in its own process group, output to ``log_path``; None, or a one-line error.

    On timeout (or an interrupt) the whole group is ended: SIGTERM, then SIGKILL after a grace.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return f"{name}: timed out after {timeout_s:.0f} s and was stopped ({timeout_knob}); log: {log_path}"
        finally:
            if proc.poll() is None:
                _end_group(proc)
    if rc != 0:
        return f"{name}: failed (exit {rc}): {_error_line(log_path)}; log: {log_path}"
    return None


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _error_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return ((errors or lines or ["(no output)"])[-1])[:300]


def run_baselines(cfg: SPDConfig, info: RunInfo) -> dict[str, str]:
    """Each requested baseline in its own subprocess; returns {name: one-line error} for failures."""
    from tqdm import tqdm

    out = Path(cfg.eval.out)
    total_threads = cfg.eval.threads or info.world_size * info.threads_per_process
    if any(b.startswith("hf_") for b in cfg.eval.baselines) and not cfg.eval.hf_dir:
        from spd_megatron.engine import resolve_checkpoint

        cfg = copy.deepcopy(cfg)
        cfg.eval.hf_dir = hf_dir(cfg, resolve_checkpoint(cfg))  # resolved (converted) once
    errors = {}
    bar = tqdm(cfg.eval.baselines, desc="baselines", unit="config", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        same_pp = name == "ar_same_pp"
        threads = info.threads_per_process if same_pp else total_threads
        nproc = info.tensor_parallel_size * info.pipeline_parallel_size if same_pp else 1
        path = write_config(baseline_config(cfg, name, info, threads), out / "configs" / f"{name}.yaml")
        error = run_subprocess(name, launch_command(nproc, path), out / "logs" / f"{name}.log",
                               cfg.eval.timeout_s, child_env(threads))
        if error:
            log.error("eval: %s", error)
            errors[name] = error
    return errors


def collect_records(cfg: SPDConfig, names: list[str]) -> dict[str, list[dict]]:
    """Each configuration's records for this run's prompts (in prompt order)."""
    from spd_megatron.eval.prompts import read_prompt_set

    order = {item.id: i for i, item in enumerate(read_prompt_set(cfg.prompts_file, cfg.prompts_limit))}
    out = {}
    for name in names:
        records = [r for r in ResultsFile(cfg.eval.out, name).read() if r["id"] in order]
        out[name] = sorted(records, key=lambda r: order[r["id"]])
    return out


def summary_meta(cfg: SPDConfig, info: RunInfo, names: list[str]) -> dict:
    sessions = {name: (ResultsFile(cfg.eval.out, name).meta() or {}).get("sessions", [])[-1:] for name in names}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "prompts_file": cfg.prompts_file,
            "prompts_limit": cfg.prompts_limit, "max_new_tokens": cfg.max_new_tokens,
            "sampling": dataclasses.asdict(cfg.sampling), "main_run": dataclasses.asdict(info),
            "threads_single_process": cfg.eval.threads or info.world_size * info.threads_per_process,
            "last_session": {n: s[0] for n, s in sessions.items() if s}}


def write_summary(cfg: SPDConfig, info: RunInfo, errors: dict[str, str]) -> dict:
    """summary.json and the plots under eval.out; the table on stderr."""
    from spd_megatron.eval.plots import write_plots
    from spd_megatron.eval.summary import build_summary, print_summary

    names = [info.name, *cfg.eval.baselines]
    summary = build_summary(info.name, collect_records(cfg, names), summary_meta(cfg, info, names), errors)
    out = Path(cfg.eval.out)
    summary["plots"] = [str(p) for p in write_plots(summary, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    return summary


def release_device_memory() -> None:
    """Give the main run's cached GPU memory back before the baselines load their models."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_eval(cfg: SPDConfig, ctx=None) -> Optional[dict]:
    """The job of tools/eval.py on every rank; the summary on rank 0 of a main run, else None.

    Raises:
        SPDError: bad input, or (after the summary is written) a baseline that failed.
    """
    from spd_megatron.parallel.init import shutdown_parallel

    info = measure(cfg, ctx)
    if info is None or cfg.eval.is_worker:
        return None
    shutdown_parallel()  # the other ranks are done; the baselines get the machine to themselves
    release_device_memory()
    errors = run_baselines(cfg, info) if cfg.eval.baselines else {}
    summary = write_summary(cfg, info, errors)
    if errors:
        raise SPDError(f"{len(errors)} baseline(s) failed: {', '.join(errors)} "
                       f"(summary without them in {Path(cfg.eval.out) / 'summary.json'})")
    return summary
