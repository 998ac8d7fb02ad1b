"""Wiring: config -> process groups -> this rank's target stage, link and schedule."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.convert.checkpoint import check_dtype, load_stage_weights, read_arch, read_record
from spd_megatron.convert.shard import check_tp_compatible
from spd_megatron.errors import SPDError
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
    stage: TargetStage | None  # None on a dedicated draft rank
    schedule: SpeculativeSchedule
    eos_token_ids: tuple[int, ...]


def resolve_checkpoint(cfg: SPDConfig) -> Path:
    """The checkpoint folder to load: model.checkpoint, or the builtin model (converted once)."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint)
    from spd_megatron.convert.builtin import ensure_builtin_checkpoint

    return ensure_builtin_checkpoint(cfg.model.builtin, cfg.model.dtype, cfg.model.cache_dir,
                                     wait_s=cfg.parallel.setup_timeout_s)


def build_placement(cfg: SPDConfig, ctx: ParallelContext, arch: ArchSpec) -> StagePlacement:
    split = stage_split(cfg, arch, ctx.pp_size)
    return StagePlacement(ctx.pp_rank, ctx.pp_size, ctx.tp_rank, ctx.tp_size, tuple(split))


def build_stage(cfg: SPDConfig, ctx: ParallelContext, ckpt: Path, arch: ArchSpec) -> TargetStage:
    """Build and load this rank's stage of the target."""
    check_dtype(ckpt, cfg.model.dtype)
    check_tp_compatible(arch, ctx.tp_size)
    placement = build_placement(cfg, ctx, arch)
    seed_megatron_rng(cfg.sampling.seed)
    spec = resolve_layer_spec_name(cfg.model.layer_spec)
    check_fp8_spec(cfg, spec)
    model = build_stage_model(arch, placement, cfg.model.dtype, spec, cfg.model.max_seq_len,
                              fp8=cfg.model.fp8, static_decode=cfg.model.cuda_graphs).to(ctx.device)
    if spec == "transformer_engine":  # the window becomes TE's window_size (target/te_attention.py)
        from spd_megatron.target.te_attention import set_sliding_window

        set_sliding_window(model, arch.sliding_window)
    with torch.no_grad():
        load_stage_weights(ckpt, model, arch, placement.layer_start, ctx.tp_rank, ctx.tp_size)
    stage = TargetStage(model, arch, placement, cfg.model.max_seq_len, device=ctx.device)
    enable_gpu_paths(cfg, ctx, stage)
    from spd_megatron.target.compiled import enable_compiled_step

    enable_compiled_step(cfg, ctx, stage)  # model.compile
    return stage


def check_fp8_spec(cfg: SPDConfig, spec: str) -> None:
    """model.fp8 needs the TE spec, which resolves only on a GPU with Transformer Engine."""
    if cfg.model.fp8 and spec != "transformer_engine":
        raise SPDError(f"model.fp8=true needs the Transformer Engine layer spec (a CUDA GPU with "
                       f"transformer_engine installed), but model.layer_spec={cfg.model.layer_spec} "
                       f"resolved to {spec} here; drop model.fp8 or run on a GPU node with TE")


def p2p_backend(ctx: ParallelContext) -> str:
    """nccl when messages live on the GPU, else gloo (what CUDA graphs with TP collectives need)."""
    return "nccl" if ctx.comm_device.type == "cuda" else "gloo"


def enable_gpu_paths(cfg: SPDConfig, ctx: ParallelContext, stage: TargetStage) -> None:
    """CUDA-graph decode steps, when configured (GPU only; FP8 current scaling needs no calibration)."""
    if cfg.model.cuda_graphs:
        from spd_megatron.target.cuda_graphs import make_decode_graphs

        stage.decode_graphs = make_decode_graphs(stage, ctx.tp_size, p2p_backend(ctx), ctx.tp_group)


def build_link(cfg: SPDConfig, ctx: ParallelContext, arch: ArchSpec) -> StageLink | None:
    if ctx.pp_size == 1:
        return None
    prev_rank = None if ctx.is_first_stage else ctx.stage_rank(ctx.pp_rank - 1)
    next_rank = None if ctx.is_last_stage else ctx.stage_rank(ctx.pp_rank + 1)
    return make_link(cfg, ctx, arch, prev_rank, next_rank, [ctx.stage_rank(s) for s in range(ctx.pp_size)])


def make_link(cfg: SPDConfig, ctx: ParallelContext, arch: ArchSpec, prev_rank, next_rank,
              stage_ranks: list[int]) -> StageLink:
    """This rank's StageLink (a stage's ring neighbours, or None/None on the dedicated draft rank)."""
    return StageLink(ctx.rank, prev_rank, next_rank, stage_ranks[0], stage_ranks[-1],
                     arch.hidden_size, TORCH_DTYPES[cfg.model.dtype], cfg.parallel.timeout_s, stage_ranks,
                     device=ctx.comm_device, control_group=ctx.claim_control_group(),
                     reverse_group=ctx.reverse_group, cpu_peers=ctx.cpu_peers)


def pdm_config(cfg: SPDConfig, arch: ArchSpec, split: list[int]):
    """The PDM's config: from draft.path, or a random PDM's from the draft section."""
    from spd_megatron.draft.features import check_anchors, default_anchors
    from spd_megatron.draft.pdm import PDMConfig, check_pdm_matches, read_pdm_config

    path = draft_path(cfg, split)
    if path:
        pdm_cfg = read_pdm_config(path)
        check_pdm_matches(pdm_cfg, arch, split)
        return pdm_cfg
    check_random_draft_allowed(cfg, split)
    anchors = check_anchors(cfg.draft.anchors or default_anchors(split), arch.num_layers)
    return PDMConfig(split, anchors, cfg.draft.num_layers, target=arch.to_dict())


SHIPPED_DRAFTS = Path(__file__).parent / "drafts"


def stage_split(cfg: SPDConfig, arch: ArchSpec, pp_size: int) -> list[int]:
    """Layers per stage: parallel.layers_per_stage; else, for a drafting schedule, the split its
    draft was trained for (draft.path, or the one shipped for this many stages); else balanced."""
    if not cfg.parallel.layers_per_stage and pp_size > 1 and get_schedule_class(cfg.schedule.name).has_draft:
        trained = trained_split(cfg, pp_size)
        if trained and sum(trained) == arch.num_layers:
            return trained
    return split_layers(arch.num_layers, pp_size, cfg.parallel.layers_per_stage)


def trained_split(cfg: SPDConfig, num_stages: int) -> list[int]:
    """The stage split of draft.path, or of the draft shipped for the builtin model with
    ``num_stages`` stages ([] if neither gives one for that many stages)."""
    folder = Path(cfg.draft.path) if cfg.draft.path else \
        None if cfg.model.checkpoint else SHIPPED_DRAFTS / cfg.model.builtin / f"n{num_stages}"
    config = folder / "pdm_config.json" if folder is not None else None
    if config is None or not config.is_file():
        return []
    split = list(json.loads(config.read_text()).get("split", []))
    return split if len(split) == num_stages else []


def draft_path(cfg: SPDConfig, split: list[int]) -> str:
    """draft.path, else a draft shipped for the builtin model and this stage layout, else ''."""
    if cfg.draft.path or cfg.model.checkpoint:
        return cfg.draft.path
    folder = SHIPPED_DRAFTS / cfg.model.builtin / f"n{len(split)}"
    config = folder / "pdm_config.json"
    if config.is_file() and json.loads(config.read_text()).get("split") == list(split):
        return str(folder)
    return ""


def shipped_splits(builtin: str) -> list[list[int]]:
    """The stage layouts of the drafts shipped for a builtin model, fewest stages first."""
    configs = (SHIPPED_DRAFTS / builtin).glob("n*/pdm_config.json")
    return sorted((json.loads(f.read_text())["split"] for f in configs), key=len)


def check_random_draft_allowed(cfg: SPDConfig, split: list[int]) -> None:
    """No trained draft fits: refuse a random PDM (acceptance ~0) unless draft.allow_random."""
    if cfg.draft.allow_random:
        log.info("SPD with a randomly initialised draft (draft.allow_random=true)")
        return
    n, layout = len(split), "[" + ",".join(map(str, split)) + "]"
    shipped = [] if cfg.model.checkpoint else shipped_splits(cfg.model.builtin)
    have = (f"drafts ship for {cfg.model.builtin} with " + " and ".join(
        f"n={len(s)} (layers_per_stage=[{','.join(map(str, s))}])" for s in shipped)) if shipped \
        else "no draft ships for model.checkpoint"
    model = f" model.checkpoint={cfg.model.checkpoint}" if cfg.model.checkpoint else ""
    raise SPDError(f"schedule.name=spd has no trained draft for {n} stages, layers_per_stage={layout}: {have}. "
                   f"Train one (python tools/train_draft.py{model} train.num_stages={n} "
                   f"parallel.layers_per_stage={layout} train.out=runs/pdm_n{n}) and pass "
                   f"draft.path=runs/pdm_n{n}/final, or pass draft.allow_random=true to run a random "
                   "draft (acceptance ~0: slower than autoregressive)")


def build_draft(cfg: SPDConfig, ckpt: Path, stage: TargetStage, ctx: ParallelContext):
    """The anchors on every rank (for the taps); the PDM itself on stage 0 when co-located."""
    pdm_cfg = pdm_config(cfg, stage.arch, list(stage.placement.layers_per_stage))
    if not stage.placement.is_first or ctx.draft_rank is not None:
        return None, pdm_cfg.anchors
    return pdm_draft(cfg, load_pdm(cfg, ckpt, pdm_cfg, stage.arch, ctx), ctx), pdm_cfg.anchors


def pdm_draft(cfg: SPDConfig, module, ctx: ParallelContext):
    """The PDM as a Draft, its step replayed as CUDA graphs when ``draft.cuda_graphs`` is set."""
    from spd_megatron.draft.pdm import PDMDraft

    graphs = None
    tp_size = 1 if ctx.is_draft_rank else ctx.tp_size  # the dedicated draft rank runs the PDM alone
    if cfg.draft.cuda_graphs:
        from spd_megatron.draft.cuda_graphs import make_pdm_graphs

        graphs = make_pdm_graphs(module, tp_size, p2p_backend(ctx), None if ctx.is_draft_rank else ctx.tp_group)
    if graphs is None:
        from spd_megatron.target.compiled import compiled_pdm_step

        graphs = compiled_pdm_step(cfg, module, tp_size)  # model.compile
    return PDMDraft(module, graphs)


def load_pdm(cfg: SPDConfig, ckpt: Path, pdm_cfg, arch: ArchSpec, ctx: ParallelContext):
    """Build the PDM; trained weights from draft.path, else random with the target's norm and head."""
    from spd_megatron.draft.pdm import PipelineDraftModule, init_from_target, load_pdm_weights

    torch.manual_seed(cfg.draft.seed)
    solo = ctx.is_draft_rank  # a dedicated draft rank runs the PDM alone (TP=1)
    module = PipelineDraftModule(pdm_cfg, arch, 0 if solo else ctx.tp_rank, 1 if solo else ctx.tp_size,
                                 cfg.model.dtype, cfg.model.max_seq_len,
                                 pg_collection=ctx.draft_groups if solo else None).to(ctx.device).eval()
    path = draft_path(cfg, pdm_cfg.split)
    with torch.no_grad():
        if path:
            load_pdm_weights(module, path)
        else:
            init_from_target(module, ckpt)
    return module


def build_schedule(cfg: SPDConfig, stage: TargetStage, link: StageLink | None,
                   ckpt: Path | None = None, ctx: ParallelContext | None = None) -> SpeculativeSchedule:
    """The configured schedule for a model rank (a draft schedule brings its draft and anchors)."""
    sampling = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p)
    cls = get_schedule_class(cfg.schedule.name)
    kwargs = {}
    if cls.has_draft:
        draft, anchors = build_draft(cfg, ckpt, stage, ctx)
        kwargs = dict(draft=draft, anchors=anchors, draft_rank=ctx.draft_rank)
    schedule = cls(stage, link, sampling, seed=cfg.sampling.seed, **kwargs)
    schedule.prefill_chunk_size = cfg.schedule.prefill_chunk_size
    return schedule


def load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    from spd_megatron.convert.sources import has_tokenizer_files

    if not has_tokenizer_files(ckpt):
        raise SPDError(f"checkpoint {ckpt} has no tokenizer files: copy the model's tokenizer.json and "
                       "tokenizer_config.json into it, or re-convert from a folder that has them")
    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


def uses_draft_rank(cfg: SPDConfig) -> bool:
    return get_schedule_class(cfg.schedule.name).has_draft and cfg.draft.placement == "dedicated"


def build_draft_server(cfg: SPDConfig, ctx: ParallelContext, ckpt: Path, arch: ArchSpec):
    """The dedicated draft rank's 'schedule': a DraftServer around the PDM (TP=1)."""
    from spd_megatron.draft.features import stage_anchors
    from spd_megatron.schedule.draft_host import DraftHost
    from spd_megatron.schedule.spd import DraftServer

    split = stage_split(cfg, arch, ctx.pp_size)
    pdm_cfg = pdm_config(cfg, arch, split)
    seed_megatron_rng(cfg.sampling.seed, outside_model_groups=True)
    draft = pdm_draft(cfg, load_pdm(cfg, ckpt, pdm_cfg, arch, ctx), ctx)
    stage_ranks = [ctx.layout.rank_of(s, 0) for s in range(ctx.pp_size)]
    link = make_link(cfg, ctx, arch, None, None, stage_ranks)
    report = [stage_anchors(s, pdm_cfg.anchors, split) for s in range(ctx.pp_size)]
    remote = {s: stage_ranks[s] for s in range(ctx.pp_size) if report[s]}
    host = DraftHost(draft, link, report, remote, ctx.pp_size, arch.hidden_size, link.dtype)
    sampling = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p)
    stage0 = [ctx.layout.rank_of(0, t) for t in range(ctx.tp_size)]
    return DraftServer(host, link, stage0, sampling, seed=cfg.sampling.seed + 1,
                       vocab_size=arch.vocab_size, use_h0=0 in pdm_cfg.anchors)


def build_engine(cfg: SPDConfig, ctx: ParallelContext | None = None) -> Engine:
    """Start (or reuse) the process groups and build this rank's part of the decoder."""
    get_schedule_class(cfg.schedule.name)  # fail fast on a typo, before any heavy work
    ctx = ctx or init_parallel(cfg.parallel, extra_ranks=int(uses_draft_rank(cfg)))
    ckpt = resolve_checkpoint(cfg)
    arch = read_arch(ckpt)
    eos = tuple(read_record(ckpt).get("eos_token_ids", ()))
    if ctx.is_draft_rank:
        server = build_draft_server(cfg, ctx, ckpt, arch)
        return Engine(cfg, ctx, ckpt, arch, load_tokenizer(ckpt), None, server, eos)
    stage = build_stage(cfg, ctx, ckpt, arch)
    schedule = build_schedule(cfg, stage, build_link(cfg, ctx, arch), ckpt, ctx)
    return Engine(cfg, ctx, ckpt, arch, load_tokenizer(ckpt), stage, schedule, eos)
