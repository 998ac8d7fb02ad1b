"""Wiring: config -> process groups -> this rank's target stage, link and schedule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.convert.checkpoint import check_dtype, load_stage_weights, read_arch, read_record
from spd_megatron.convert.shard import check_tp_compatible
from spd_megatron.parallel.cpu_compat import seed_megatron_rng
from spd_megatron.parallel.init import ParallelContext, init_parallel
from spd_megatron.parallel.layout import split_layers
from spd_megatron.parallel.link import StageLink
from spd_megatron.sampling.logits import SamplingParams
from spd_megatron.schedule import SpeculativeSchedule, get_schedule_class
from spd_megatron.target.arch import ArchSpec
from spd_megatron.target.build import TORCH_DTYPES, StagePlacement, build_stage_model
from spd_megatron.target.specs import resolve_layer_spec_name
from spd_megatron.target.stage import TargetStage

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Everything one rank needs to decode."""

    cfg: SPDConfig
    ctx: ParallelContext
    checkpoint: Path
    arch: ArchSpec
    tokenizer: Any
    stage: TargetStage
    schedule: SpeculativeSchedule
    eos_token_ids: tuple[int, ...]


def resolve_checkpoint(cfg: SPDConfig) -> Path:
    """The checkpoint folder to load: model.checkpoint, or the builtin model (converted once)."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint)
    from spd_megatron.convert.builtin import ensure_builtin_checkpoint

    return ensure_builtin_checkpoint(cfg.model.builtin, cfg.model.dtype, cfg.model.cache_dir)


def build_placement(cfg: SPDConfig, ctx: ParallelContext, arch: ArchSpec) -> StagePlacement:
    split = split_layers(arch.num_layers, ctx.pp_size, cfg.parallel.layers_per_stage)
    return StagePlacement(ctx.pp_rank, ctx.pp_size, ctx.tp_rank, ctx.tp_size, tuple(split))


def build_stage(cfg: SPDConfig, ctx: ParallelContext, ckpt: Path, arch: ArchSpec) -> TargetStage:
    """Build and load this rank's stage of the target."""
    check_dtype(ckpt, cfg.model.dtype)
    check_tp_compatible(arch, ctx.tp_size)
    placement = build_placement(cfg, ctx, arch)
    seed_megatron_rng(cfg.sampling.seed)
    spec = resolve_layer_spec_name(cfg.model.layer_spec)
    model = build_stage_model(arch, placement, cfg.model.dtype, spec, cfg.model.max_seq_len,
                              fp8=cfg.model.fp8).to(ctx.device)
    with torch.no_grad():
        load_stage_weights(ckpt, model, arch, placement.layer_start, ctx.tp_rank, ctx.tp_size)
    return TargetStage(model, arch, placement, cfg.model.max_seq_len)


def build_link(cfg: SPDConfig, ctx: ParallelContext, arch: ArchSpec) -> StageLink | None:
    if ctx.pp_size == 1:
        return None
    prev_rank = None if ctx.is_first_stage else ctx.stage_rank(ctx.pp_rank - 1)
    next_rank = None if ctx.is_last_stage else ctx.stage_rank(ctx.pp_rank + 1)
    stage_ranks = [ctx.stage_rank(s) for s in range(ctx.pp_size)]
    return StageLink(ctx.rank, prev_rank, next_rank, stage_ranks[0], stage_ranks[-1],
                     arch.hidden_size, TORCH_DTYPES[cfg.model.dtype], cfg.parallel.timeout_s, stage_ranks)


def build_draft(cfg: SPDConfig, ckpt: Path, stage: TargetStage, ctx: ParallelContext):
    """The PDM config on every rank (for the anchor taps), its module on stage 0 only."""
    from spd_megatron.draft.features import check_anchors, default_anchors
    from spd_megatron.draft.pdm import PDMConfig, PDMDraft, check_pdm_matches, read_pdm_config

    split = list(stage.placement.layers_per_stage)
    if cfg.draft.path:
        pdm_cfg = read_pdm_config(cfg.draft.path)
        check_pdm_matches(pdm_cfg, stage.arch, split)
    else:
        anchors = check_anchors(cfg.draft.anchors or default_anchors(split), stage.arch.num_layers)
        pdm_cfg = PDMConfig(split, anchors, cfg.draft.num_layers, target=stage.arch.to_dict())
    if not stage.placement.is_first:
        return None, pdm_cfg.anchors
    return PDMDraft(load_pdm(cfg, ckpt, pdm_cfg, stage, ctx)), pdm_cfg.anchors


def load_pdm(cfg: SPDConfig, ckpt: Path, pdm_cfg, stage: TargetStage, ctx: ParallelContext):
    """Build the PDM; trained weights from draft.path, else random with the target's norm and head."""
    from spd_megatron.draft.pdm import PipelineDraftModule, init_from_target, load_pdm_weights

    torch.manual_seed(cfg.draft.seed)
    module = PipelineDraftModule(pdm_cfg, stage.arch, ctx.tp_rank, ctx.tp_size, cfg.model.dtype,
                                 cfg.model.max_seq_len).eval()
    with torch.no_grad():
        if cfg.draft.path:
            load_pdm_weights(module, cfg.draft.path)
        else:
            init_from_target(module, ckpt)
    return module


def build_schedule(cfg: SPDConfig, stage: TargetStage, link: StageLink | None,
                   ckpt: Path | None = None, ctx: ParallelContext | None = None) -> SpeculativeSchedule:
    sampling = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p)
    cls = get_schedule_class(cfg.schedule.name)
    kwargs = {}
    if cls.has_draft:
        draft, anchors = build_draft(cfg, ckpt, stage, ctx)
        kwargs = dict(draft=draft, anchors=anchors)
    schedule = cls(stage, link, sampling, seed=cfg.sampling.seed, **kwargs)
    schedule.prefill_chunk_size = cfg.schedule.prefill_chunk_size
    return schedule


def load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


def build_engine(cfg: SPDConfig, ctx: ParallelContext | None = None) -> Engine:
    """Start (or reuse) the process groups and build this rank's part of the decoder."""
    get_schedule_class(cfg.schedule.name)  # fail fast on a typo, before any heavy work
    ctx = ctx or init_parallel(cfg.parallel)
    ckpt = resolve_checkpoint(cfg)
    arch = read_arch(ckpt)
    stage = build_stage(cfg, ctx, ckpt, arch)
    schedule = build_schedule(cfg, stage, build_link(cfg, ctx, arch), ckpt, ctx)
    eos = tuple(read_record(ckpt).get("eos_token_ids", ()))
    return Engine(cfg, ctx, ckpt, arch, load_tokenizer(ckpt), stage, schedule, eos)
