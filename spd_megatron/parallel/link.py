"""StageLink: the only code that sends or receives between ranks.

Every message is a fixed 5-int64 header, optionally followed by payload tensors whose shapes the
header (and the protocol) give. Receives wait with a timeout; when a wait fails, the error names
the peer, and a failure that another rank reported (see ``report_failure``) is raised in its
place, so every rank ends with the root cause instead of "connection closed".

Pre-posted receives (``parallel.prepost_receives``, given a ``control_group``): headers travel on
a gloo group of their own, payloads on the default group (NCCL on GPUs). Nothing but headers uses
the control channel, so the next header receive from a peer is posted as soon as the previous
header arrived, long before the peer sends; reading it never synchronises a GPU stream. On the
ring edge every message also carries a first hidden row (a zero row when it has none) whose
receive is posted in the same way, and only rows 2.. of a multi-token message (a prompt chunk)
are received on demand:

    ring message  = header (control) + row 0 [1, 1, h] (data, pre-posted) + rows 1.. (data, if count > 1)

A steady decode cycle thus finds its header and its hidden row already in place. Row 0 is posted
ahead only after a decode step (STEP) and never after STOP, so no payload receive is left pending
once a sequence ends (a later link on the same group could otherwise lose a message to it).

Directions (``reverse_group``): NCCL runs a rank pair's operations on one communicator, in issue
order on one stream, and a send larger than its buffer waits for the peer's matching receive. Both
directions of a pair on one stream can cycle (stage 0 sends prompt chunk 2 while stage 1 sends
chunk 1's anchors back: each send waits behind the other). So messages to a higher global rank use
the default group and messages to a lower one ``reverse_group`` (every rank, made by
``parallel.init``): each (pair, group) carries one direction, matched in order, and a send waits
only for the receiver's host to post its receive. New message kinds (a server's requests) follow
the rule through ``_group_to`` / ``_group_from``. tests/distributed/test_p2p_ordering.py replays the
schedules' message sequences on a simulated NCCL (per-pair in-order streams, bounded buffers).
Without a reverse group (tools' bare links), on NCCL the ring row is posted ahead only where the
previous stage is not stage 0. NCCL payload receives never block the host (``_wait_payload``).

Host-memory peers (``cpu_peers``): messages to and from these ranks live on the CPU, so under a
``cpu:gloo,cuda:nccl`` group they go over gloo (a dedicated draft rank: parallel/backend.py).
"""

from __future__ import annotations

import time
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
    REQUEST = 10  # serving rank 0 -> every rank: a sequence to decode (spd_megatron/serve/wire.py)
    IDLE = 11  # serving rank 0 -> every rank: no work yet (a heartbeat: see ``wait_for_work``)
    SHUTDOWN = 12  # serving rank 0 -> every rank: leave the serving loop


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
        control_group: the gloo group for headers (pre-posted receives), or None: headers share
            the default group and every receive is posted when it is needed.
        reverse_group: the group for messages to lower global ranks (see the module docstring),
            or None: both directions share the default group.
        cpu_peers: ranks whose messages live in host memory (gloo) whatever ``device`` is.
    """

    def __init__(self, rank: int, prev_rank: Optional[int], next_rank: Optional[int],
                 first_rank: int, last_rank: int, hidden_size: int, dtype: torch.dtype,
                 timeout_s: float, stage_ranks: Optional[list[int]] = None,
                 device: Optional[torch.device] = None, control_group=None, reverse_group=None,
                 cpu_peers: frozenset = frozenset()) -> None:
        self.rank = rank
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.stage_ranks = stage_ranks or [first_rank, last_rank]  # global rank of each stage
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.first_rank, self.last_rank = first_rank, last_rank
        self.hidden_size, self.dtype = hidden_size, dtype
        self.timeout = timedelta(seconds=timeout_s)
        self.control = control_group
        self.reverse = reverse_group
        self.cpu_peers = frozenset(cpu_peers)
        self.nccl = self.device.type == "cuda"  # NCCL ordering rules apply (tests set it to replay them)
        self._pending_sends: list = []
        self._header_posts: dict[int, tuple] = {}  # src -> (work, [5] buffer) posted ahead
        self._row_post: Optional[tuple] = None  # (work, [1, 1, h] buffer): the ring's next row 0
        self._ring_hidden: Optional[Tensor] = None  # hidden of the ring message just received
        self.wait_seconds = 0.0  # host time blocked in receives (stats; NCCL payload waits do not block)

    @property
    def preposts(self) -> bool:
        return self.control is not None

    @property
    def preposts_rows(self) -> bool:
        """Row 0 of the next ring message posted ahead (never in front of sends back to stage 0 on
        one NCCL stream: with a reverse group those travel on another one)."""
        return self.preposts and (not self._nccl_with(self.prev_rank) or self.reverse is not None
                                  or self.prev_rank != self.first_rank)

    def _nccl_with(self, peer: Optional[int]) -> bool:
        return self.nccl and peer not in self.cpu_peers

    def _device_for(self, peer: Optional[int]) -> torch.device:
        return torch.device("cpu") if peer in self.cpu_peers else self.device

    def _group_to(self, dst: int):
        """The payload group for a message to ``dst``: default upwards, reverse downwards."""
        return self.reverse if self.reverse is not None and dst < self.rank else None

    def _group_from(self, src: int):
        return self.reverse if self.reverse is not None and src > self.rank else None

    # ---- sends: asynchronous; buffers stay alive until the next flush ------------------------
    def _isend(self, tensor: Tensor, dst: int, header_channel: bool = False) -> None:
        if header_channel:
            group = self.control
        else:
            tensor, group = tensor.to(self._device_for(dst)), self._group_to(dst)  # no copy when there
        if len(self._pending_sends) > 64:  # keep the list short in long decodes
            self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        self._pending_sends.append((dist.isend(tensor, dst, group=group), tensor))

    def _irecv(self, shape: tuple, dtype: torch.dtype, src: int) -> tuple:
        """(work, buffer): a payload receive from ``src`` on the group of its direction."""
        buf = torch.empty(shape, dtype=dtype, device=self._device_for(src))
        return dist.irecv(buf, src, group=self._group_from(src)), buf

    def _send_header(self, header: Header, dst: int) -> None:
        if self.preposts:
            self._isend(header.to_tensor(), dst, header_channel=True)  # [5] in host memory
        else:
            self._isend(header.to_tensor(self._device_for(dst)), dst)

    def flush(self) -> None:
        """Wait for the outstanding sends (bounded by the timeout)."""
        for work, _tensor in self._pending_sends:
            self._wait(work, "send to", None)
        self._pending_sends.clear()

    def send_next(self, header: Header, hidden: Optional[Tensor] = None) -> None:
        """To the next stage: a header, then ``hidden`` [count, 1, h] if given."""
        if hidden is not None and hidden.shape[0] != header.count:
            raise RuntimeError(f"ring message of {header.count} tokens with {hidden.shape[0]} hidden rows")
        self._send_header(header, self.next_rank)
        if not self.preposts:
            if hidden is not None:
                self._isend(hidden.contiguous(), self.next_rank)
            return
        if hidden is None:  # row 0 is always sent: its receive is already posted
            hidden = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self._device_for(self.next_rank))
        self._isend(hidden[:1].contiguous(), self.next_rank)  # [1, 1, h]
        if hidden.shape[0] > 1:
            self._isend(hidden[1:].contiguous(), self.next_rank)  # [count - 1, 1, h]

    def send_to_first(self, header: Header, *tensors: Tensor) -> None:
        """To stage 0 (the token feedback edge of the ring; reports to a draft on stage 0)."""
        self.send_to(self.first_rank, header, *tensors)

    # ---- receives: blocking with a timeout --------------------------------------------------
    def recv_header(self, src: int) -> Header:
        if not self.preposts:
            work, buf = self._irecv((Header.SIZE,), torch.long, src)
            self._wait(work, "header from", src)
            return Header.from_tensor(buf)
        work, buf = self._header_posts.pop(src, None) or self._post_header(src)
        self._wait(work, "header from", src)
        self._header_posts[src] = self._post_header(src)  # only headers use this channel
        return Header.from_tensor(buf)

    def _post_header(self, src: int) -> tuple:
        buf = torch.empty(Header.SIZE, dtype=torch.long)  # [5], host memory (gloo)
        return dist.irecv(buf, src, group=self.control), buf

    def recv_hidden(self, count: int) -> Tensor:
        """[count, 1, h] from the previous stage (the message ``recv_prev`` just returned)."""
        if not self.preposts:
            return self._recv_rows(count)
        hidden, self._ring_hidden = self._ring_hidden, None
        if hidden is None or hidden.shape[0] != count:
            raise RuntimeError(f"recv_hidden({count}) does not follow a ring message of {count} tokens")
        return hidden

    def _recv_rows(self, count: int) -> Tensor:
        work, buf = self._irecv((count, 1, self.hidden_size), self.dtype, self.prev_rank)
        self._wait_payload(work, "hidden states from", self.prev_rank)
        return buf

    def _recv_ring_rows(self, header: Header) -> None:
        """Row 0 (pre-posted after a STEP), rows 1.. on demand; post the next row 0 after a STEP."""
        work, row0 = self._row_post or self._post_row()
        self._row_post = None
        self._wait_payload(work, "hidden states from", self.prev_rank)
        hidden = row0  # [1, 1, h]
        if header.count > 1:
            hidden = torch.cat([row0, self._recv_rows(header.count - 1)])  # [count, 1, h]
        self._ring_hidden = hidden if header.count > 0 else None
        if header.op == Op.STEP and self.preposts_rows:  # decode steps follow; a prompt chunk or STOP may end the exchange
            self._row_post = self._post_row()

    def _post_row(self) -> tuple:
        return self._irecv((1, 1, self.hidden_size), self.dtype, self.prev_rank)  # buffer [1, 1, h]

    def send_to(self, dst: int, header: Header, *tensors: Tensor) -> None:
        """A header and payload tensors to any rank of this TP slot (e.g. a report to the draft rank)."""
        self._send_header(header, dst)
        for tensor in tensors:
            self._isend(tensor.contiguous(), dst)

    def recv_tensor(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A payload of known shape from ``src`` (shapes are fixed by the protocol, never sent)."""
        work, buf = self._irecv(shape, dtype, src)
        self._wait_payload(work, "payload from", src)
        return buf

    def recv_prev(self) -> Header:
        """A ring message from the previous stage; its hidden rows follow with ``recv_hidden``."""
        header = self.recv_header(self.prev_rank)
        if self.preposts:
            self._recv_ring_rows(header)
        return header

    def recv_from_last(self) -> Header:
        return self.recv_header(self.last_rank)

    def wait_for_work(self, src: int, is_cancelled) -> Optional[Header]:
        """An idle serving rank: the next REQUEST or SHUTDOWN header from ``src``, however late.

        No overall timeout, yet every single wait has one: while ``src`` has no work it sends an
        IDLE header at least every ``timeout_s / 4`` (spd_megatron/serve), so a dead or stuck
        ``src`` still ends this rank within ``timeout_s``. (A gloo wait cannot be retried after
        it timed out, and a receive cannot be polled: ``is_completed`` stays False until
        ``wait``.) ``is_cancelled()`` is checked at each IDLE; True returns None.
        """
        while True:
            header = self.recv_header(src)
            if header.op != Op.IDLE:
                return header
            if is_cancelled():
                return None

    def _wait_payload(self, work, what: str, peer: Optional[int]) -> None:
        """A payload receive: stream-ordered on NCCL when its header came over the control channel.

        NCCL's ``wait(timeout)`` blocks the host until the transfer is done (polling every
        millisecond), a host synchronisation per message. ``wait()`` only orders the current
        stream after it. The payload's header has already arrived (a timed gloo wait), so its
        sender has posted the send; a peer that dies between the two is caught by NCCL's own
        watchdog (the process group's ``parallel.setup_timeout_s``). Host-side waits elsewhere.
        """
        if self.preposts and self._nccl_with(peer):
            work.wait()
            return
        self._wait(work, what, peer)

    def _wait(self, work, what: str, peer: Optional[int]) -> None:
        import time

        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise_peer_failure()
            waited = time.perf_counter() - start
            limit = self.timeout.total_seconds()
            why = (f"within {limit:.0f} s ({str(err).splitlines()[0][:120]}); that rank is stuck or died: see "
                   "its log, or raise parallel.timeout_s") if waited >= 0.9 * limit else \
                  (f"after {waited:.1f} s: the connection failed ({str(err).splitlines()[0][:120]}); that rank "
                   "died: see its log")
            raise SPDError(f"rank {self.rank}: no {what} rank {peer} {why}") from None
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


_SHOWN_KEY = "spd_megatron/error_shown"


def mark_error_shown() -> None:
    """Rank 0 has printed the run's error: the other ranks need not print theirs."""
    store = _store()
    if store is not None:
        try:
            store.set(_SHOWN_KEY, "1")
        except Exception:  # noqa: BLE001 - best effort while failing
            pass


def error_shown_by_rank0(wait_s: float) -> bool:
    """True once rank 0 says it printed the run's error; False if it has not within ``wait_s``."""
    store, deadline = _store(), time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if store is not None and store.check([_SHOWN_KEY]):
                return True
        except Exception:  # noqa: BLE001 - store gone: rank 0 has exited
            return False
        time.sleep(0.05)
    return False


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
