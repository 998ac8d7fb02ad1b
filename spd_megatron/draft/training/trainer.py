"""PDM training: frozen Megatron target as teacher, block layout + structured mask, KL loss.

One step = one conversation: the teacher's anchor states and logits (no grad), the PDM over all
``m`` blocks with the mask for a drawn fill (50 %: n, else U{1..n-1}), KL to the teacher on the
draft vocabulary at positions whose next token is an assistant token (docs/SPD.md section 3).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_megatron.draft.pdm import PipelineDraftModule, load_pdm_weights, save_pdm
from spd_megatron.draft.training.data import Example
from spd_megatron.draft.training.vocab import draft_index
from spd_megatron.draft.training.mask import attention_mask, block_positions, block_types, depth_types


@dataclass
class Batch:
    """Teacher features of one conversation."""

    anchors: dict[int, Tensor]  # h^k [S, h] for every anchor k (pre-final-norm)
    logits: Tensor  # teacher logits [S, V]
    targets: Tensor  # [S] bool: position t trains (token t+1 is an assistant token)


class Teacher:
    """The frozen target on one process: anchor taps and logits in one forward."""

    def __init__(self, stage, anchors: list[int]) -> None:
        self.stage = stage
        stage.set_taps(anchors)
        self.anchors = anchors

    @torch.no_grad()
    def features(self, example: Example) -> Batch:
        ids = torch.tensor([example.ids])  # [1, S]
        logits = self.stage.forward(0, token_ids=ids)[0].float()  # [S, V]
        anchors = {k: self.stage.taps[k][:, 0].float().clone() for k in self.anchors}  # [S, h]
        targets = torch.tensor(example.assistant[1:] + [False])
        return Batch(anchors, logits, targets)


class PDMTrainer:
    """Optimises a PipelineDraftModule on teacher features."""

    def __init__(self, module: PipelineDraftModule, lr: float, warmup: int, total_steps: int,
                 seed: int = 0) -> None:
        self.module = module
        cfg = module.cfg
        self.types = depth_types(cfg.num_stages, cfg.anchors, cfg.split)
        self.blocks = block_types(cfg.num_stages, cfg.anchors, cfg.split)
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(total_steps, 1)))
        self.rng = random.Random(seed)
        self.step = 0
        self.to_draft = draft_index(module.vocab_ids, module.arch.vocab_size)

    def draw_fill(self) -> int:
        """The fill trick: the steady staircase half the time, else a warm-up/refill state."""
        n = self.module.cfg.num_stages
        return n if n == 1 or self.rng.random() < 0.5 else self.rng.randint(1, n - 1)

    def forward(self, batch: Batch, fill: int) -> Tensor:
        """Draft-vocabulary logits of the g_0 rows. [S, V_d]."""
        seq_len = batch.logits.shape[0]
        rows = [self.module.row_input_all(batch.anchors, b) for b in self.blocks]  # m x [S, h]
        x = torch.cat(rows, dim=0).unsqueeze(1)  # [m S, 1, h]
        mask = attention_mask(self.types, self.blocks, seq_len, fill)  # [1, 1, m S, m S]
        rope = self.module.layers.rotary_pos_emb(seq_len)[block_positions(len(self.blocks), seq_len)]
        decoder = self.module.layers.decoder
        decoder.set_input_tensor(x)
        hidden = decoder(hidden_states=x, attention_mask=mask, rotary_pos_emb=rope)  # [m S, 1, h]
        return self.module.logits(hidden[-seq_len:, 0])  # the g_0 block is last

    def valid(self, batch: Batch) -> Tensor:
        """[S] bool: the next token is an assistant token and the teacher's argmax is in the draft vocab."""
        return batch.targets & (self.to_draft[batch.logits.argmax(-1)] >= 0)

    def loss(self, batch: Batch, logits: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, float, int]:
        """KL(teacher || PDM) over the draft vocabulary at valid positions; top-1 agreement."""
        valid = self.valid(batch) if valid is None else valid
        count = int(valid.sum())
        if count == 0:
            return logits.sum() * 0.0, 0.0, 0
        teacher = batch.logits[valid][:, self.module.vocab_ids]  # [N, V_d], renormalised by the softmax
        p_log = F.log_softmax(teacher, dim=-1)
        q_log = F.log_softmax(logits[valid].float(), dim=-1)
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")
        agree = (q_log.argmax(-1) == p_log.argmax(-1)).float().mean().item()
        return kl, agree, count

    def train_step(self, batches: Batch | list[Batch]) -> tuple[float, float, int]:
        """One optimizer step over one or more conversations (token-weighted mean of their KL)."""
        batches = [batches] if isinstance(batches, Batch) else batches
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        valids = [self.valid(b) for b in batches]  # [S] bool each
        total = sum(int(v.sum()) for v in valids)
        loss_sum = agree_sum = 0.0
        for batch, valid in zip(batches, valids):
            fill = self.draw_fill()
            if total == 0:
                continue
            loss, agree, count = self.loss(batch, self.forward(batch, fill), valid)
            if count:
                (loss * (count / total)).backward()
                loss_sum, agree_sum = loss_sum + loss.item() * count, agree_sum + agree * count
        if total:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return loss_sum / max(total, 1), agree_sum / max(total, 1), total

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> dict:
        """Held-out KL and top-1 agreement at the steady state (fill = n), token-weighted."""
        self.module.eval()
        total = kl_sum = agree_sum = 0
        for batch in batches:
            loss, agree, count = self.loss(batch, self.forward(batch, self.module.cfg.num_stages))
            kl_sum, agree_sum, total = kl_sum + float(loss) * count, agree_sum + agree * count, total + count
        return {"kl": kl_sum / max(total, 1), "agreement": agree_sum / max(total, 1), "tokens": total}

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
