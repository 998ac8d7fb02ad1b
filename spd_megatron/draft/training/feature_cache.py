"""Teacher-feature cache (``train.feature_cache=DIR``): each training conversation's anchor states
and the teacher's top-k log-probabilities over the draft vocabulary, written the first time the
conversation is trained on, so later epochs cost only the PDM (issue 12 item 4).

The loss on cached features is the KL on the kept mass: the k teacher tokens, plus one bucket for
the rest (teacher mass ``1 - sum p_topk`` against the student's mass outside the top-k). With
k = V_d it is the exact KL. The folder records what it was made for (target, anchors, stage
layout, draft vocabulary, k, the conversations); opening it for anything else fails in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_megatron.errors import SPDError

META = "meta.json"


@dataclass
class TopK:
    """The teacher's k most likely draft tokens per position."""

    logp: Tensor  # [S, k] log-probabilities over the draft vocabulary, descending
    index: Tensor  # [S, k] draft-vocabulary indices

    def rows(self, valid: Tensor) -> "TopK":
        return TopK(self.logp[valid], self.index[valid])


def top_k(draft_logits: Tensor, k: int) -> TopK:
    """[S, V_d] teacher logits (draft vocabulary) -> TopK with k = min(k, V_d)."""
    logp = F.log_softmax(draft_logits.float(), dim=-1)
    values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [S, k]
    return TopK(values, index)


def topk_kl_sum(top: TopK, student: Tensor) -> tuple[Tensor, float, int]:
    """Summed kept-mass KL of [N, k] teacher rows vs [N, V_d] student logits; agreement count; N."""
    q_log = F.log_softmax(student.float(), dim=-1)  # [N, V_d]
    index = top.index.to(student.device)
    p_top = top.logp.to(student.device).exp()  # [N, k]
    kl = (p_top * (top.logp.to(student.device) - q_log.gather(1, index))).sum()
    rest_p = (1 - p_top.sum(-1)).clamp(min=0)  # [N]
    if index.shape[1] < q_log.shape[1]:
        rest_q = q_log.scatter(1, index, float("-inf")).logsumexp(-1)  # [N]
        kl = kl + torch.where(rest_p > 0, rest_p * (rest_p.clamp(min=1e-30).log() - rest_q), 0.0).sum()
    agree = (q_log.argmax(-1) == index[:, 0]).sum().item()
    return kl, agree, index.shape[0]


def cache_key(arch: dict, ckpt: Path, anchors, split, vocab_ids, k: int, examples) -> dict:
    """What a cache is valid for."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.ids, ex.assistant]).encode())
    vocab = hashlib.sha256(json.dumps(list(vocab_ids or [])).encode()).hexdigest()[:16]
    return {"target": arch, "checkpoint": str(Path(ckpt).resolve()), "anchors": list(anchors),
            "layers_per_stage": list(split), "draft_vocab": vocab, "top_k": k,
            "conversations": digest.hexdigest()[:16]}


class FeatureCache:
    """One file per training conversation: anchors (fp32) + TopK + targets."""

    def __init__(self, folder: str | Path, key: dict) -> None:
        self.folder = Path(folder)
        self.k = key["top_k"]
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / META
        if meta.is_file():
            made = json.loads(meta.read_text())
            differs = sorted(name for name in set(made) | set(key) if made.get(name) != key.get(name))
            if differs:
                raise SPDError(f"train.feature_cache={folder} was made for another target or layout (differs in: "
                               f"{', '.join(differs)}); use an empty folder or delete this one")
        else:
            _atomic_write(meta, lambda f: f.write(json.dumps(key, indent=1).encode()))

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.pt"

    def get(self, index: int):
        from spd_megatron.draft.training.trainer import Batch

        path = self.path(index)
        if not path.is_file():
            return None
        record = torch.load(path, weights_only=True)
        top = TopK(record["logp"].float(), record["index"].long())
        return Batch(record["anchors"], None, record["targets"], draft=True, top=top)

    def put(self, index: int, batch):
        """Store a batch with draft-vocabulary logits; returns its cached (top-k) form."""
        from spd_megatron.draft.training.trainer import Batch

        if not batch.draft:
            raise SPDError("the feature cache stores draft-vocabulary logits; set train.draft_vocab_size")
        top = top_k(batch.logits, self.k)
        record = {"anchors": batch.anchors, "targets": batch.targets, "logp": top.logp, "index": top.index.int()}
        _atomic_write(self.path(index), lambda f: torch.save(record, f))
        return Batch(batch.anchors, None, batch.targets, draft=True, top=top)


class FeatureSource:
    """Features of training conversations by index: from the cache, else the teacher (then cached)."""

    def __init__(self, teacher, examples, cache: Optional[FeatureCache] = None) -> None:
        self.teacher, self.examples, self.cache = teacher, examples, cache

    def __call__(self, indices: list[int]) -> list:
        if self.cache is None:
            return self.teacher.features_batch([self.examples[i] for i in indices])
        found = {i: self.cache.get(i) for i in indices}
        missing = [i for i in indices if found[i] is None]
        computed = self.teacher.features_batch([self.examples[i] for i in missing]) if missing else []
        for i, batch in zip(missing, computed):
            found[i] = self.cache.put(i, batch)
        return [found[i] for i in indices]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    tmp.replace(path)
