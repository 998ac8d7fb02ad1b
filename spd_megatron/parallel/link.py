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
    ROLLBACK = 5  # truncate the cache to `position`


@dataclass(frozen=True)
class Header:
    op: Op
    position: int = 0
    count: int = 0
    token: int = -1

    def to_tensor(self) -> Tensor:
        return torch.tensor([int(self.op), self.position, self.count, self.token], dtype=torch.long)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Header":
        op, position, count, token = (int(x) for x in t.tolist())
        return cls(Op(op), position, count, token)


class StageLink:
    """Point-to-point messages between the pipeline stages of one TP slot.

    Args:
        rank: this process's global rank.
        prev_rank / next_rank: global ranks of the neighbouring stages (None at the ends).
        first_rank / last_rank: global ranks of stage 0 and the last stage in this TP slot.
        hidden_size, dtype: the hidden-state payload.
        timeout_s: longest wait for any message.
    """

    def __init__(self, rank: int, prev_rank: Optional[int], next_rank: Optional[int],
                 first_rank: int, last_rank: int, hidden_size: int, dtype: torch.dtype,
                 timeout_s: float) -> None:
        self.rank = rank
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.first_rank, self.last_rank = first_rank, last_rank
        self.hidden_size, self.dtype = hidden_size, dtype
        self.timeout = timedelta(seconds=timeout_s)
        self._pending_sends: list = []
        self.wait_seconds = 0.0  # time spent blocked in receives (for the stats table)

    # ---- sends: asynchronous; buffers stay alive until the next flush ------------------------
    def _isend(self, tensor: Tensor, dst: int) -> None:
        self._pending_sends.append((dist.isend(tensor, dst), tensor))

    def flush(self) -> None:
        """Wait for the outstanding sends (bounded by the timeout)."""
        for work, _tensor in self._pending_sends:
            self._wait(work, "send to", None)
        self._pending_sends.clear()

    def send_next(self, header: Header, hidden: Optional[Tensor] = None) -> None:
        """To the next stage: a header, then ``hidden`` [count, 1, h] if given."""
        self._isend(header.to_tensor(), self.next_rank)
        if hidden is not None:
            self._isend(hidden.contiguous(), self.next_rank)

    def send_to_first(self, header: Header) -> None:
        """Last stage -> stage 0 (the token feedback edge of the ring)."""
        self._isend(header.to_tensor(), self.first_rank)

    # ---- receives: blocking with a timeout --------------------------------------------------
    def recv_header(self, src: int) -> Header:
        buf = torch.empty(4, dtype=torch.long)
        self._wait(dist.irecv(buf, src), "header from", src)
        return Header.from_tensor(buf)

    def recv_hidden(self, count: int) -> Tensor:
        """[count, 1, h] from the previous stage."""
        buf = torch.empty(count, 1, self.hidden_size, dtype=self.dtype)
        self._wait(dist.irecv(buf, self.prev_rank), "hidden states from", self.prev_rank)
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
