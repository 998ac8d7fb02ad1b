"""StageLink: the only code that sends or receives between ranks.

Every message on the pipeline ring is a fixed 4-int64 header, optionally followed by a hidden
tensor whose length the header gives. Receives wait with a timeout; when a wait fails, the error
names the peer, and a failure that another rank reported (see ``report_failure``) is raised in
its place, so every rank ends with the root cause instead of "connection closed".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from spd_megatron.errors import SPDError

_FAILURE_KEY = "spd_megatron/failure"


class Op(IntEnum):
    """What a message asks the receiving stage to do."""

    PREFILL = 1  # process `count` prompt tokens starting at `position`
    STEP = 2  # process `count` decode tokens starting at `position`
    TOKEN = 3  # last stage -> first stage: the next token is `token`
    STOP = 4  # finish the sequence
    REPORT = 5  # stage -> draft host: anchor states of `count` tokens
    VERDICT = 6  # last stage -> stage 0: argmax in `token` (+ logits when sampling)
    SEQUENCE = 7  # stage 0 -> dedicated draft rank: a new prompt of `count` tokens follows
    ROWS = 8  # stage 0 -> dedicated draft rank: this cycle's rows (`token` = rollback position)
    PROPOSAL = 9  # dedicated draft rank -> stage 0: the draft token in `token`


@dataclass(frozen=True)
class Header:
    """A fixed 5-int64 message head: what to do, where, how many tokens, a token id, the epoch.

    epoch counts rejects: a message with a newer epoch than the receiver's tells it to truncate its
    KV cache to ``position`` first (rollback rides on the corrected token's own message).
    """

    op: Op
    position: int = 0
    count: int = 0
    token: int = -1
    epoch: int = 0

    SIZE = 5

    def to_tensor(self, device: Optional[torch.device] = None) -> Tensor:
        """[5] int64 on ``device`` (CPU by default)."""
        return torch.tensor([int(self.op), self.position, self.count, self.token, self.epoch],
                            dtype=torch.long, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Header":
        op, position, count, token, epoch = (int(x) for x in t.tolist())
        return cls(Op(op), position, count, token, epoch)


class StageLink:
    """Point-to-point messages between the pipeline stages of one TP slot.

    Args:
        rank: this process's global rank.
        prev_rank / next_rank: global ranks of the neighbouring stages (None at the ends).
        first_rank / last_rank: global ranks of stage 0 and the last stage in this TP slot.
        stage_ranks: global rank of every stage in this TP slot (for reports to/from any stage).
        hidden_size, dtype: the hidden-state payload.
        timeout_s: longest wait for any message.
        device: where messages live while in transit: the GPU for NCCL (which only moves device
            tensors), the CPU for gloo. Payloads are moved there before sending (a no-op when they
            already are) and received tensors arrive there; callers move them where they compute.
    """

    def __init__(self, rank: int, prev_rank: Optional[int], next_rank: Optional[int],
                 first_rank: int, last_rank: int, hidden_size: int, dtype: torch.dtype,
                 timeout_s: float, stage_ranks: Optional[list[int]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.rank = rank
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.stage_ranks = stage_ranks or [first_rank, last_rank]  # global rank of each stage
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.first_rank, self.last_rank = first_rank, last_rank
        self.hidden_size, self.dtype = hidden_size, dtype
        self.timeout = timedelta(seconds=timeout_s)
        self._pending_sends: list = []
        self.wait_seconds = 0.0  # time spent blocked in receives (for the stats table)

    # ---- sends: asynchronous; buffers stay alive until the next flush ------------------------
    def _isend(self, tensor: Tensor, dst: int) -> None:
        tensor = tensor.to(self.device)  # no copy when it is already there
        if len(self._pending_sends) > 64:  # keep the list short in long decodes
            self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        self._pending_sends.append((dist.isend(tensor, dst), tensor))

    def flush(self) -> None:
        """Wait for the outstanding sends (bounded by the timeout)."""
        for work, _tensor in self._pending_sends:
            self._wait(work, "send to", None)
        self._pending_sends.clear()

    def send_next(self, header: Header, hidden: Optional[Tensor] = None) -> None:
        """To the next stage: a header, then ``hidden`` [count, 1, h] if given."""
        self._isend(header.to_tensor(self.device), self.next_rank)
        if hidden is not None:
            self._isend(hidden.contiguous(), self.next_rank)

    def send_to_first(self, header: Header, *tensors: Tensor) -> None:
        """To stage 0 (the token feedback edge of the ring; reports to a draft on stage 0)."""
        self.send_to(self.first_rank, header, *tensors)

    # ---- receives: blocking with a timeout --------------------------------------------------
    def recv_header(self, src: int) -> Header:
        buf = torch.empty(Header.SIZE, dtype=torch.long, device=self.device)
        self._wait(dist.irecv(buf, src), "header from", src)
        return Header.from_tensor(buf)

    def recv_hidden(self, count: int) -> Tensor:
        """[count, 1, h] from the previous stage."""
        buf = torch.empty(count, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        self._wait(dist.irecv(buf, self.prev_rank), "hidden states from", self.prev_rank)
        return buf

    def send_to(self, dst: int, header: Header, *tensors: Tensor) -> None:
        """A header and payload tensors to any rank of this TP slot (e.g. a report to the draft rank)."""
        self._isend(header.to_tensor(self.device), dst)
        for tensor in tensors:
            self._isend(tensor.contiguous(), dst)

    def recv_tensor(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A payload of known shape from ``src`` (shapes are fixed by the protocol, never sent)."""
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(dist.irecv(buf, src), "payload from", src)
        return buf

    def recv_prev(self) -> Header:
        return self.recv_header(self.prev_rank)

    def recv_from_last(self) -> Header:
        return self.recv_header(self.last_rank)

    def _wait(self, work, what: str, peer: Optional[int]) -> None:
        import time

        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise_peer_failure()
            raise SPDError(
                f"rank {self.rank}: no {what} rank {peer} within {self.timeout.total_seconds():.0f} s "
                f"({str(err).splitlines()[0][:120]}); that rank is stuck or died: see its log, "
                "or raise parallel.timeout_s"
            ) from None
        finally:
            self.wait_seconds += time.perf_counter() - start


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store, no propagation
        return None


def report_failure(rank: int, message: str) -> None:
    """Publish this rank's error so peers blocked on it raise the same message."""
    store = _store()
    if store is None:
        return
    try:
        store.compare_set(_FAILURE_KEY, "", f"rank {rank}: {message}")
    except Exception:  # noqa: BLE001 - best effort while failing
        pass


def raise_peer_failure() -> None:
    """Raise SPDError with another rank's reported failure, if there is one."""
    store = _store()
    if store is None:
        return
    try:
        if store.check([_FAILURE_KEY]):
            message = store.get(_FAILURE_KEY).decode()
            raise SPDError(message)
    except SPDError:
        raise
    except Exception:  # noqa: BLE001 - store gone with the failed rank
        return


def gather_to_rank0(obj):
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere). One-off, never per cycle."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (e.g. the prompts a resumed eval skips). One-off, never per cycle."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
