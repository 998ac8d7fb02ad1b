"""PDM training: frozen Megatron target as teacher, block layout + structured mask, KL loss.

A micro-batch is several conversations padded to a common length with a batch dimension (one
forward of the teacher and one of the PDM); padding sits after each conversation's last token, so
the causal structure keeps it out of every real row. Each conversation draws its own fill (50 %:
n, else U{1..n-1}); the loss is the KL to the teacher on the draft vocabulary at positions whose
next token is an assistant token, summed over the global batch and divided by its count of such
positions, so one conversation at a time, a padded batch and DP ranks give the same step
(docs/SPD.md section 3; issue 12).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spd_megatron.draft.pdm import PipelineDraftModule, load_pdm_weights, save_pdm
from spd_megatron.draft.training.data import Example
from spd_megatron.draft.training.feature_cache import TopK, topk_kl_sum
from spd_megatron.draft.training.mask import attention_mask, block_positions, block_types, depth_types
from spd_megatron.draft.training.vocab import draft_index

TEACHER_TOKENS = 2048  # padded tokens per teacher forward (bounds the [B, S, V] logits)


@dataclass
class Batch:
    """Teacher features of one conversation."""

    anchors: dict[int, Tensor]  # h^k [S, h] for every anchor k (pre-final-norm)
    logits: Tensor  # teacher logits [S, V], or [S, V_d] when ``draft``
    targets: Tensor  # [S] bool: position t trains (token t+1 is an assistant token)
    draft: bool = False  # logits already over the draft vocabulary, targets already inside it
    top: Optional[TopK] = None  # cached teacher top-k (feature_cache.py); then ``logits`` is None


class Teacher:
    """The frozen target on one process: anchor taps and logits in one forward."""

    def __init__(self, stage, anchors: list[int]) -> None:
        self.stage = stage
        stage.set_taps(anchors)
        self.anchors = anchors
        self.vocab_ids: Optional[Tensor] = None  # set by ``restrict``

    def restrict(self, vocab_ids: Tensor) -> None:
        """Keep only the draft vocabulary's logits (and drop positions whose argmax lies outside it)."""
        self.vocab_ids = vocab_ids

    def features(self, example: Example) -> Batch:
        return self.features_batch([example])[0]

    @torch.no_grad()
    def features_batch(self, examples: list[Example]) -> list[Batch]:
        """Features of several conversations, in padded forwards of at most TEACHER_TOKENS tokens."""
        out, chunk = [], []
        for ex in examples:
            if chunk and (len(chunk) + 1) * max(len(ex.ids), *(len(c.ids) for c in chunk)) > TEACHER_TOKENS:
                out += self._padded(chunk)
                chunk = []
            chunk.append(ex)
        return out + (self._padded(chunk) if chunk else [])

    def _padded(self, examples: list[Example]) -> list[Batch]:
        from spd_megatron.target.kv_cache import causal_mask

        seq_len = max(len(ex.ids) for ex in examples)
        ids = torch.zeros(len(examples), seq_len, dtype=torch.long)  # [B, S], right-padded
        for i, ex in enumerate(examples):
            ids[i, :len(ex.ids)] = torch.tensor(ex.ids)
        device = self.stage.device
        logits = self.stage.model(ids.to(device), None, causal_mask(0, seq_len, device=device),
                                  runtime_gather_output=True).float()  # [B, S, V]
        taps = {k: self.stage.taps[k].float() for k in self.anchors}  # [S, B, h] each
        return [self._one(ex, logits[i, :len(ex.ids)], {k: v[:len(ex.ids), i].clone() for k, v in taps.items()})
                for i, ex in enumerate(examples)]

    def _one(self, ex: Example, logits: Tensor, anchors: dict[int, Tensor]) -> Batch:
        targets = torch.tensor(ex.assistant[1:] + [False])
        if self.vocab_ids is None:
            return Batch(anchors, logits.clone(), targets)
        in_vocab = torch.isin(logits.argmax(-1), self.vocab_ids.to(logits.device))  # [S]
        return Batch(anchors, logits[:, self.vocab_ids].contiguous(), targets & in_vocab.cpu(), draft=True)


class BlockForward(nn.Module):
    """The PDM over the block layout of a padded micro-batch (the module DDP wraps)."""

    def __init__(self, module: PipelineDraftModule) -> None:
        super().__init__()
        self.module = module
        cfg = module.cfg
        self.types = depth_types(cfg.num_stages, cfg.anchors, cfg.split)
        self.blocks = block_types(cfg.num_stages, cfg.anchors, cfg.split)
        self._masks: dict[tuple[int, int], Tensor] = {}

    def forward(self, anchors: dict[int, Tensor], fills: list[int], valid: Tensor) -> Tensor:
        """anchors {k: [B, S, h]}, fills [B], valid [B, S] bool -> draft logits [N, V_d] of the valid rows."""
        hidden = self.hidden(anchors, fills)  # [S, B, h]
        return self.module.logits(hidden.transpose(0, 1)[valid])  # [N, V_d], conversation by conversation

    def hidden(self, anchors: dict[int, Tensor], fills: list[int]) -> Tensor:
        """Final PDM states of the g_0 block. [S, B, h]."""
        seq_len = next(iter(anchors.values())).shape[1]
        rows = [self.module.row_input_all(anchors, b) for b in self.blocks]  # m x [B, S, h]
        x = torch.cat(rows, dim=1).transpose(0, 1).contiguous()  # [m S, B, h]
        mask = torch.cat([self.mask(seq_len, f) for f in fills]).to(x.device)  # [B, 1, m S, m S]
        layers = self.module.layers
        rope = layers.rotary_pos_emb(seq_len)[block_positions(len(self.blocks), seq_len)]  # [m S, 1, 1, d]
        layers.decoder.set_input_tensor(x)
        hidden = layers.decoder(hidden_states=x, attention_mask=mask, rotary_pos_emb=rope)  # [m S, B, h]
        return hidden[-seq_len:]  # the g_0 block is last

    def mask(self, seq_len: int, fill: int) -> Tensor:
        key = (seq_len, fill)
        if key not in self._masks:
            if len(self._masks) > 256:
                self._masks.clear()
            self._masks[key] = attention_mask(self.types, self.blocks, seq_len, fill)  # [1, 1, m S, m S]
        return self._masks[key]


INITS = ("spec", "early_exit")


def apply_init(module: PipelineDraftModule, init: str, freeze_head: bool) -> None:
    """Study options (issue 12 item 6) on a PDM fresh from ``init_from_target``.

    ``early_exit``: every projection passes its deepest anchor through (W_i = [0 .. 0 I]) and each
    PDM layer starts as the identity (attention and MLP output projections zero), so the first
    prediction is the target's head on the newest row's features. ``freeze_head``: the head stays
    the target's own output rows (as EAGLE keeps the LM head).
    """
    from spd_megatron.errors import SPDError

    if init not in INITS:
        raise SPDError(f"train.init={init} is unknown; use one of {', '.join(INITS)}")
    if init == "early_exit":
        with torch.no_grad():
            for proj in module.projections.values():
                hidden = proj.weight.shape[0]
                proj.weight.zero_()[:, -hidden:] = torch.eye(hidden)
            for layer in module.layers.decoder.layers:
                layer.self_attention.linear_proj.weight.zero_()
                layer.mlp.linear_fc2.weight.zero_()
    module.head.weight.requires_grad_(not freeze_head)


def pad_anchors(batches: list[Batch], device) -> dict[int, Tensor]:
    """{k: [B, S, h]} zero-padded to the longest conversation."""
    seq_len = max(b.targets.shape[0] for b in batches)
    return {k: torch.stack([F.pad(b.anchors[k], (0, 0, 0, seq_len - b.anchors[k].shape[0])) for b in batches])
            .to(device) for k in batches[0].anchors}


class PDMTrainer:
    """Optimises a PipelineDraftModule on teacher features (DDP over ``dp`` when it has ranks)."""

    def __init__(self, module: PipelineDraftModule, lr: float, warmup: int, total_steps: int,
                 seed: int = 0, dp=None) -> None:
        self.module = module
        self.block = BlockForward(module)
        self.dp = dp if dp is not None and dp.size > 1 else None
        self.net = self.block
        if self.dp is not None:
            with warnings.catch_warnings():  # newer torch prefers forward_sync_buffers, which older ones lack
                warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
                self.net = nn.parallel.DistributedDataParallel(self.block, process_group=self.dp.group,
                                                               broadcast_buffers=False)  # constant buffers
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(total_steps, 1)))
        self.rng = random.Random(seed)
        self.step = 0
        self.to_draft = draft_index(module.vocab_ids.cpu(), module.arch.vocab_size)

    def draw_fill(self) -> int:
        """The fill trick: the steady staircase half the time, else a warm-up/refill state."""
        n = self.module.cfg.num_stages
        return n if n == 1 or self.rng.random() < 0.5 else self.rng.randint(1, n - 1)

    def forward(self, batch: Batch, fill: int) -> Tensor:
        """Draft-vocabulary logits of every g_0 row of one conversation. [S, V_d]."""
        hidden = self.block.hidden(pad_anchors([batch], self.device), [fill])  # [S, 1, h]
        return self.module.logits(hidden[:, 0])

    @property
    def device(self):
        return self.module.head.weight.device

    def valid(self, batch: Batch) -> Tensor:
        """[S] bool: the next token is an assistant token and the teacher's argmax is in the draft vocab."""
        if batch.draft:
            return batch.targets
        return batch.targets & (self.to_draft[batch.logits.argmax(-1).cpu()] >= 0)

    def teacher_logits(self, batch: Batch, valid: Tensor) -> Tensor:
        """[N, V_d] teacher logits at the valid positions (renormalised later by the softmax)."""
        logits = batch.logits[valid.to(batch.logits.device)]
        return logits if batch.draft else logits[:, self.module.vocab_ids.to(logits.device)]

    def loss(self, batch: Batch, logits: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, float, int]:
        """KL(teacher || PDM) over the draft vocabulary at valid positions (mean); top-1 agreement."""
        valid = self.valid(batch) if valid is None else valid
        kl, agree, count = self._kl_sum(self.teacher_logits(batch, valid), logits[valid.to(logits.device)])
        return kl / max(count, 1), agree / max(count, 1), count

    @staticmethod
    def _kl_sum(teacher: Tensor, student: Tensor) -> tuple[Tensor, float, int]:
        """Summed KL and agreement count of [N, V_d] teacher vs student logits."""
        p_log = F.log_softmax(teacher.to(student.device).float(), dim=-1)
        q_log = F.log_softmax(student.float(), dim=-1)
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="sum")
        agree = (q_log.argmax(-1) == p_log.argmax(-1)).sum().item()
        return kl, agree, teacher.shape[0]

    def train_step(self, batches, fills: Optional[list[list[int]]] = None) -> tuple[float, float, int]:
        """One optimizer step. ``batches``: a Batch, a list of Batch (one forward each, accumulated)
        or a list of micro-batches (lists of Batch, one padded forward each). ``fills`` mirrors the
        micro-batches (drawn here in order when None). Returns the global mean KL, agreement, count."""
        micro = [[batches]] if isinstance(batches, Batch) else [b if isinstance(b, list) else [b] for b in batches]
        fills = fills if fills is not None else [[self.draw_fill() for _ in mb] for mb in micro]
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        valids = [[self.valid(b) for b in mb] for mb in micro]  # [S] bool each
        local = sum(int(v.sum()) for vs in valids for v in vs)
        total = int(self._all_sum(torch.tensor([float(local)]))[0])
        sums = torch.zeros(2)  # KL sum, agreement count
        for i, (mb, fl, vs) in enumerate(zip(micro, fills, valids)):
            if total == 0:
                break
            with self._sync(last=i == len(micro) - 1):
                kl, agree, _ = self._micro(mb, fl, vs)
                (kl * ((self.dp.size if self.dp else 1) / total)).backward()
            sums += torch.tensor([kl.item(), agree])
        if total:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()
        self.schedule.step()
        self.step += 1
        sums = self._all_sum(sums)
        return float(sums[0]) / max(total, 1), float(sums[1]) / max(total, 1), total

    def _micro(self, batches: list[Batch], fills: list[int], valids: list[Tensor], net=None) -> tuple[Tensor, float, int]:
        seq_len = max(b.targets.shape[0] for b in batches)
        valid = torch.stack([F.pad(v, (0, seq_len - v.shape[0])) for v in valids]).to(self.device)  # [B, S]
        student = (net or self.net)(pad_anchors(batches, self.device), fills, valid)  # [N, V_d]
        if batches[0].top is not None:  # cached features: the KL on the kept mass
            rows = [b.top.rows(v) for b, v in zip(batches, valids)]
            return topk_kl_sum(TopK(torch.cat([r.logp for r in rows]), torch.cat([r.index for r in rows])), student)
        teacher = torch.cat([self.teacher_logits(b, v) for b, v in zip(batches, valids)])  # [N, V_d]
        return self._kl_sum(teacher, student)

    def _sync(self, last: bool):
        import contextlib

        return self.net.no_sync() if self.dp is not None and not last else contextlib.nullcontext()

    def _all_sum(self, values: Tensor) -> Tensor:
        if self.dp is not None:
            torch.distributed.all_reduce(values, group=self.dp.group)
        return values

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], chunk: int = 4) -> dict:
        """Held-out KL and top-1 agreement at the steady state (fill = n), token-weighted; with DP
        every rank passes its shard of the held-out set and all get the global numbers."""
        self.module.eval()
        sums = torch.zeros(3)  # KL sum, agreement count, positions
        n = self.module.cfg.num_stages
        for i in range(0, len(batches), chunk):
            part = batches[i:i + chunk]
            kl, agree, count = self._micro(part, [n] * len(part), [self.valid(b) for b in part], self.block)
            sums += torch.tensor([float(kl), agree, count])
        kl, agree, total = self._all_sum(sums).tolist()
        return {"kl": kl / max(total, 1), "agreement": agree / max(total, 1), "tokens": int(total)}

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, out_dir: Path, extra: dict) -> None:
        """PDM weights (fp32 here, to resume exactly) + optimizer + step + RNG, written atomically."""
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        save_pdm(self.module, tmp, dtype="float32")
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "step": self.step, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
                    **extra}, tmp / "trainer_state.pt")
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        tmp.rename(out_dir)

    def load(self, ckpt_dir: Path) -> dict:
        load_pdm_weights(self.module, ckpt_dir)
        state = torch.load(ckpt_dir / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, _ = state["step"], self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        return state
