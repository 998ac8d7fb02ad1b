"""What rank 0 tells the other ranks while serving: a request, a heartbeat, or shutdown.

Between sequences every rank other than 0 waits in ``StageLink.wait_for_work`` for one header
from rank 0. A request is ``REQUEST(position=max_new_tokens, count=prompt_len, token=seed,
epoch=flags)`` followed by the prompt ids [count] (int64) and the sampling knobs [3] (float64:
temperature, top_p, top_k); every rank then runs ``schedule.generate`` on it, exactly as
examples/decode.py does for a prompt, and nothing else is exchanged until the sequence ends.
While rank 0 has no work it sends IDLE every ``heartbeat_s`` (so waits keep their timeout);
SHUTDOWN ends the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from spd_megatron.parallel.link import Header, Op, StageLink
from spd_megatron.sampling.logits import SamplingParams

log = logging.getLogger(__name__)

IGNORE_EOS = 1  # flags bit: decode max_new_tokens tokens whatever the model says


@dataclass(frozen=True)
class DecodeRequest:
    """One sequence for the pipeline: the same on every rank."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


def heartbeat_seconds(timeout_s: float) -> float:
    """How often an idle rank 0 sends IDLE: well inside every other rank's receive timeout."""
    return min(1.0, timeout_s / 4)


def send_request(link: StageLink, ranks: list[int], req: DecodeRequest) -> None:
    """Rank 0: the request to every other rank (asynchronous; ``generate`` flushes)."""
    header = Header(Op.REQUEST, req.max_new_tokens, len(req.prompt_ids), req.seed,
                    IGNORE_EOS if req.ignore_eos else 0)
    ids = torch.tensor(req.prompt_ids, dtype=torch.long)  # [prompt_len]
    knobs = torch.tensor([req.temperature, req.top_p, float(req.top_k)], dtype=torch.float64)  # [3]
    for rank in ranks:
        link.send_to(rank, header, ids, knobs)


def send_all(link: StageLink, ranks: list[int], op: Op) -> None:
    """Rank 0: IDLE or SHUTDOWN to every other rank, waiting until they are out."""
    for rank in ranks:
        link.send_to(rank, Header(op))
    link.flush()


def recv_request(link: StageLink, header: Header, src: int = 0) -> DecodeRequest:
    """The payload of a REQUEST header from ``src``."""
    ids = link.recv_tensor(src, (header.count,), torch.long).cpu().tolist()
    temperature, top_p, top_k = link.recv_tensor(src, (3,), torch.float64).cpu().tolist()
    return DecodeRequest(tuple(ids), header.position, temperature, top_p, int(top_k), header.token,
                         bool(header.epoch & IGNORE_EOS))


def prepare_schedule(schedule, req: DecodeRequest) -> None:
    """This request's sampling knobs and seed, on any rank's schedule (or draft server).

    A dedicated draft rank seeds its generator with ``seed + 1``, as engine.py does.
    """
    schedule.sampling = req.sampling
    offset = 1 if type(schedule).__name__ == "DraftServer" else 0
    schedule.generator = torch.Generator().manual_seed(req.seed + offset)


def run(engine, req: DecodeRequest, on_token=None, should_stop=None):
    """Decode ``req`` on this rank (every rank calls it for the same request)."""
    prepare_schedule(engine.schedule, req)
    eos = () if req.ignore_eos else engine.eos_token_ids
    kwargs = {"should_stop": should_stop} if should_stop is not None else {}
    return engine.schedule.generate(list(req.prompt_ids), req.max_new_tokens, eos,
                                    on_token=on_token, **kwargs)


def follow_rank0(engine, link: StageLink, is_cancelled: Callable[[], bool]) -> Optional[str]:
    """A rank other than 0: decode every request rank 0 sends until SHUTDOWN.

    Returns None after SHUTDOWN, or "cancelled" when ``is_cancelled`` stopped the wait.
    """
    while True:
        header = link.wait_for_work(0, is_cancelled)
        if header is None:
            return "cancelled"
        if header.op == Op.SHUTDOWN:
            return None
        if header.op != Op.REQUEST:
            raise RuntimeError(f"serving protocol: expected REQUEST, IDLE or SHUTDOWN, got {header.op.name}")
        run(engine, recv_request(link, header))
