"""The Pipeline Draft Module (PDM): multi-depth aggregation -> S transformer layers -> draft head.

docs/SPD.md section 2. A token at depth d contributes the row ``W_{a(d)} concat(h^{b_0..b_{a(d)}})``;
the rows (pending completed token, in-flight tokens, newest token) run through ``S`` Megatron
TransformerLayers built with the target's configuration (full attention, RoPE at each row's
absolute position) over the PDM's own KV cache, which keeps completed rows only; the newest row
goes through the target's frozen final norm and a head over the draft vocabulary. The layers use
the static-position attention, so the step can be replayed as a CUDA graph (``draft/cuda_graphs.py``).
No communication in here: the schedule hands over the anchor states.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from spd_megatron.draft.base import Draft, DraftContext, DraftProposal, DraftRow
from spd_megatron.draft.features import aggregation_type, check_anchors
from spd_megatron.errors import SPDError
from spd_megatron.sampling.logits import SamplingParams, target_probs
from spd_megatron.target.arch import ArchSpec
from spd_megatron.target.build import TORCH_DTYPES, StagePlacement, build_stage_model
from spd_megatron.target.kv_cache import StageKVCache, causal_mask

PDM_CONFIG, PDM_WEIGHTS = "pdm_config.json", "pdm.safetensors"


@dataclass
class PDMConfig:
    """What defines a PDM; saved next to its weights. ``split`` is the target's stage layout."""

    split: list[int]  # layers per target stage (n = len(split))
    anchors: list[int]  # hidden-state indices b_0 = 0 < b_1 < ...
    num_layers: int = 1  # S, the PDM's transformer layers
    draft_vocab: Optional[list[int]] = None  # target ids the head predicts (None: full vocabulary)
    target: Optional[dict] = None  # the target's ArchSpec dict (identity check at load)

    @property
    def num_stages(self) -> int:
        return len(self.split)

    def types(self) -> list[int]:
        """Reachable aggregation types a(d), d = 0..n (unreachable ones get no weights)."""
        return sorted({aggregation_type(d, self.anchors, self.split) for d in range(self.num_stages + 1)})


class PipelineDraftModule(nn.Module):
    """The PDM network. ``forward`` runs rows over the cache; ``logits`` gives draft-vocab logits.

    ``layer_spec``: the spec of its transformer layers (lean; ``local`` only for A/B measurements).
    """

    def __init__(self, cfg: PDMConfig, arch: ArchSpec, tp_rank: int = 0, tp_size: int = 1,
                 dtype: str = "float32", max_seq_len: int = 2048, pg_collection=None,
                 layer_spec: str = "lean") -> None:
        super().__init__()
        self.cfg, self.arch = cfg, arch
        self.tp_rank, self.tp_size = tp_rank, tp_size
        hidden = arch.hidden_size
        self.projections = nn.ModuleDict({
            str(i): nn.Linear((i + 1) * hidden, hidden, bias=False) for i in cfg.types()})
        layer_arch = dataclasses.replace(arch, num_layers=cfg.num_layers, sliding_window=None)
        placement = StagePlacement(0, 1, tp_rank, tp_size, (cfg.num_layers,))
        self.layers = build_stage_model(layer_arch, placement, dtype, layer_spec, max_seq_len,
                                        pre_process=False, post_process=False, initialize=True,
                                        pg_collection=pg_collection, static_decode=True)
        self.final_norm = nn.RMSNorm(hidden, eps=arch.rms_norm_eps)
        vocab = cfg.draft_vocab or list(range(arch.vocab_size))
        self.register_buffer("vocab_ids", torch.tensor(vocab, dtype=torch.long), persistent=False)
        self.head = nn.Linear(hidden, len(vocab), bias=False)
        for proj in self.projections.values():
            nn.init.normal_(proj.weight, std=0.02)
        self.final_norm.weight.requires_grad_(False)  # the target's, frozen
        self.to(TORCH_DTYPES[dtype])
        self.cache = StageKVCache(max_seq_len)

    def row_input(self, row: DraftRow, depth: int) -> Tensor:
        """g_{a(d)}(token) = W_i concat(h^{b_0..b_i}) -> [h]."""
        return self.row_input_all(row.anchors, aggregation_type(depth, self.cfg.anchors, self.cfg.split))

    def row_input_all(self, anchors: dict[int, Tensor], agg_type: int) -> Tensor:
        """W_i concat(h^{b_0..b_i}) for anchors of any leading shape: [..., h] -> [..., h]."""
        weight = self.projections[str(agg_type)].weight
        feats = [anchors[b].to(weight.device) for b in self.cfg.anchors[: agg_type + 1]]
        return torch.cat(feats, dim=-1).to(weight.dtype) @ weight.t()

    def forward(self, rows: Tensor, start: int) -> Tensor:
        """Rows [R, 1, h] at positions [start, start + R) over the cache -> hidden [R, 1, h]."""
        self.cache.prepare_write(start, rows.shape[0])
        self.layers.set_input_tensor(rows)
        device = self.head.weight.device
        dummy_ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # ignored: no embedding here
        out = self.layers(dummy_ids, None, causal_mask(start, rows.shape[0], device=device),
                          inference_context=self.cache.context, runtime_gather_output=True)
        self.cache.commit_write(start, rows.shape[0])
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """Draft-vocabulary logits [..., V_d] from PDM hidden states [..., h]."""
        return self.head(self.final_norm(hidden))


class PDMDraft(Draft):
    """The PDM as the SPD schedule's draft: rows in, one proposal out, completed rows cached."""

    def __init__(self, module: PipelineDraftModule, graphs=None) -> None:
        self.module = module
        self.anchor_indices = tuple(module.cfg.anchors)
        self.graphs = graphs  # a draft.cuda_graphs.PDMGraphs, or None (eager steps)

    def start(self, prompt_rows: list[DraftRow]) -> None:
        """Cache every prompt position as a completed (deepest) row."""
        self.module.cache.truncate(0)
        if prompt_rows:
            self._run(prompt_rows, keep=len(prompt_rows))

    def truncate(self, length: int) -> None:
        self.module.cache.truncate(min(length, self.module.cache.length))

    def propose(self, ctx: DraftContext, params: SamplingParams, generator: torch.Generator) -> DraftProposal:
        rows = [r for r in ctx.rows if r.position >= self.module.cache.length]
        keep = sum(1 for r in rows if r.depth >= self.module.cfg.num_stages)  # completed rows stay
        start, x = self._inputs(rows)
        logits = self.graphs.step(x, start) if self.graphs is not None else None  # [V_d]
        if logits is None:
            logits = self.module.logits(self.module(x, start)[-1, 0]).float()  # [V_d]
        self.module.cache.truncate(start + keep)  # in-flight rows are transient
        return self._choose(logits, params, generator)

    def _run(self, rows: list[DraftRow], keep: int) -> Tensor:
        start, x = self._inputs(rows)
        hidden = self.module(x, start)
        self.module.cache.truncate(start + keep)  # in-flight rows are transient
        return hidden

    def _inputs(self, rows: list[DraftRow]) -> tuple[int, Tensor]:
        """The rows' first position and their aggregated inputs [R, 1, h]."""
        start = rows[0].position
        if start != self.module.cache.length:
            raise RuntimeError(f"PDM rows start at {start} but its cache holds {self.module.cache.length}")
        x = torch.stack([self.module.row_input(r, r.depth) for r in rows]).unsqueeze(1)  # [R, 1, h]
        return start, x.to(self.module.head.weight.dtype)

    def _choose(self, logits: Tensor, params: SamplingParams, generator) -> DraftProposal:
        ids = self.module.vocab_ids
        if params.is_greedy:
            return DraftProposal(int(ids[torch.argmax(logits)]))
        ids, logits = ids.cpu(), logits.cpu()  # sampling runs on the host (CPU generator)
        q_sub = target_probs(logits, params)  # [V_d]
        q = torch.zeros(self.module.arch.vocab_size)
        q[ids] = q_sub
        return DraftProposal(int(ids[torch.multinomial(q_sub, 1, generator=generator)]), q)


# ---- checkpoint ------------------------------------------------------------------------------
def save_pdm(module: PipelineDraftModule, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Weights (safetensors, layer names as in megatron) and the config record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(TORCH_DTYPES[dtype]).contiguous()
               for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    save_file(tensors, str(out / PDM_WEIGHTS))
    record = {**dataclasses.asdict(module.cfg), "dtype": dtype}
    (out / PDM_CONFIG).write_text(json.dumps(record))
    return out


def read_pdm_config(path: str | Path) -> PDMConfig:
    file = Path(path) / PDM_CONFIG
    if not file.is_file():
        raise SPDError(f"draft.path={path} is not a PDM checkpoint (no {PDM_CONFIG}); train one with "
                       "tools/train_draft.py or leave draft.path empty for a random PDM")
    record = json.loads(file.read_text())
    record.pop("dtype", None)
    return PDMConfig(**record)


def load_pdm_weights(module: PipelineDraftModule, path: str | Path) -> None:
    """Load weights saved by ``save_pdm`` (TP=1 tensors; the PDM layers are sliced per TP rank)."""
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    with safe_open(str(Path(path) / PDM_WEIGHTS), framework="pt") as f:
        missing = set(own) - set(f.keys())
        if missing:
            raise SPDError(f"PDM checkpoint {path} lacks {sorted(missing)[:3]}; it does not match this config")
        for name, target in own.items():
            tensor = _read_tp_slice(f, name, module)
            if tensor.shape != target.shape:
                raise SPDError(f"PDM tensor {name} has shape {list(tensor.shape)}, expected "
                               f"{list(target.shape)}; re-train for this layout")
            target.copy_(tensor)


def init_from_target(module: PipelineDraftModule, ckpt: str | Path) -> None:
    """A fresh PDM: the target's final norm (frozen) and its output-layer rows of the draft vocab."""
    from spd_megatron.convert.checkpoint import WEIGHTS

    with safe_open(str(Path(ckpt) / WEIGHTS), framework="pt") as f:
        module.final_norm.weight.copy_(f.get_tensor("decoder.final_layernorm.weight"))
        head = f.get_tensor("output_layer.weight")  # [V, h]
        module.head.weight.copy_(head[module.vocab_ids.cpu()])  # the PDM may already be on a GPU


def check_pdm_matches(cfg: PDMConfig, arch: ArchSpec, split: Sequence[int]) -> None:
    """A draft is trained for one target and one stage layout."""
    check_anchors(cfg.anchors, arch.num_layers)
    if list(split) != list(cfg.split):
        raise SPDError(f"the draft was trained for stage layout {cfg.split} but this run uses "
                       f"{list(split)}; set parallel.layers_per_stage={cfg.split} or use a matching draft")
    if cfg.target is not None and cfg.target.get("hidden_size") != arch.hidden_size:
        raise SPDError("the draft was trained for another target model (hidden size differs)")


def _read_tp_slice(f, name: str, module: PipelineDraftModule) -> Tensor:
    """PDM transformer layers are TP-sharded like the target's; everything else is replicated."""
    if module.tp_size > 1 and name.startswith("layers."):
        from spd_megatron.convert.shard import shard_for_tp

        return shard_for_tp(name, f.get_slice(name), module.arch, module.tp_rank, module.tp_size)
    return f.get_tensor(name)
