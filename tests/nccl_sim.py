"""A simulated NCCL point-to-point network, to replay the message sequences StageLink issues.

NCCL semantics modelled (what can make point-to-point traffic deadlock):
- every (rank pair, group) has one communicator and one stream per rank: that rank's sends to and
  receives from the peer on that group run in issue order, one at a time;
- a send completes when its bytes fit in the pair's buffer for that direction (``capacity`` bytes
  sent but not yet received), or when the peer's stream has reached the matching receive
  (rendezvous); otherwise it blocks its stream, and everything behind it;
- a receive completes when its message is in the buffer or its send is at the peer's stream head.
Sends and receives match in order per (group, source, destination). The host of a rank issues
operations in program order and stops at each ``wait`` until that operation has completed. Every
wait is treated as a host wait: NCCL's stream-ordered ``wait()`` makes every later NCCL operation
of the rank (they all order after the current stream) wait too, so this only adds blocking; the
schedules also read received values on the host soon after (argmax, ``.cpu()``, ``.tolist()``).
The ``control`` group is gloo: unbounded buffering and no streams.

A trace is a list of events per rank: ("send", op, peer, group, nbytes), ("recv", op, peer, group,
nbytes), ("wait", op); ``op`` numbers a rank's operations. ``TraceRecorder`` records them from the
real StageLink by standing in for ``torch.distributed`` inside parallel/link.py.
"""

from __future__ import annotations

from collections import defaultdict, deque
from datetime import timedelta

GLOO_GROUPS = frozenset({"control"})


class Deadlock(AssertionError):
    pass


def simulate(traces: dict[int, list[tuple]], capacity: int) -> None:
    """Run every rank's trace to the end, or raise Deadlock naming what each rank waits for."""
    sim = _Sim(traces, capacity)
    while sim.step():
        pass
    stuck = {r: sim.blocked_on(r) for r in traces if sim.blocked_on(r)}
    if stuck:
        raise Deadlock("deadlock: " + "; ".join(f"rank {r} {what}" for r, what in sorted(stuck.items())))


class _Sim:
    def __init__(self, traces, capacity):
        self.traces, self.capacity = traces, capacity
        self.pc = {r: 0 for r in traces}
        self.done: set = set()  # (rank, op) completed
        self.ops: dict = {}  # (rank, op) -> (kind, peer, group, nbytes, seq)
        self.streams = defaultdict(deque)  # (rank, group, peer) -> op ids in issue order
        self.buffer = defaultdict(dict)  # (group, src, dst) -> {seq: nbytes} sent, not received
        self.posted = defaultdict(dict)  # (group, src, dst, kind) -> {seq: (rank, op)} issued
        self.counts = defaultdict(int)  # (group, src, dst, kind) -> ops issued so far
        self.gloo_recvs: set = set()  # (rank, op) gloo receives not yet completed

    def step(self) -> bool:
        progress = False
        for rank in self.traces:
            progress |= self._run_host(rank)
        for key in list(self.streams):
            progress |= self._run_stream(key)
        return self._run_gloo() or progress

    def _run_host(self, rank) -> bool:
        trace, moved = self.traces[rank], False
        while self.pc[rank] < len(trace):
            event = trace[self.pc[rank]]
            if event[0] == "wait":
                if (rank, event[1]) not in self.done:
                    break
            else:
                self._issue(rank, *event)
            self.pc[rank] += 1
            moved = True
        return moved

    def _issue(self, rank, kind, op, peer, group, nbytes) -> None:
        src, dst = (rank, peer) if kind == "send" else (peer, rank)
        chan = (group, src, dst, kind)
        seq = self.counts[chan]
        self.counts[chan] += 1
        self.ops[(rank, op)] = (kind, peer, group, nbytes, seq)
        self.posted[chan][seq] = (rank, op)
        if group in GLOO_GROUPS:
            if kind == "send":
                self.buffer[(group, src, dst)][seq] = nbytes
                self.done.add((rank, op))
            else:
                self.gloo_recvs.add((rank, op))
            return
        self.streams[(rank, group, peer)].append(op)

    def _run_stream(self, key) -> bool:
        rank, group, peer = key
        stream, moved = self.streams[key], False
        while stream:
            kind, _, _, nbytes, seq = self.ops[(rank, stream[0])]
            src, dst = (rank, peer) if kind == "send" else (peer, rank)
            buf = self.buffer[(group, src, dst)]
            if kind == "recv" and seq in buf:
                del buf[seq]
            elif kind == "send" and sum(buf.values()) + nbytes <= self.capacity:
                buf[seq] = nbytes
            elif self._peer_head_matches(rank, group, src, dst, kind, seq):
                other = self.posted[(group, src, dst, "recv" if kind == "send" else "send")][seq]
                self.streams[(other[0], group, rank)].popleft()
                self.done.add(other)
            else:
                break
            self.done.add((rank, stream.popleft()))
            moved = True
        return moved

    def _peer_head_matches(self, rank, group, src, dst, kind, seq) -> bool:
        other = self.posted[(group, src, dst, "recv" if kind == "send" else "send")].get(seq)
        if other is None:
            return False
        stream = self.streams[(other[0], group, rank)]
        return bool(stream) and stream[0] == other[1]

    def _run_gloo(self) -> bool:
        arrived = set()
        for rank, op in self.gloo_recvs:
            _, peer, group, _, seq = self.ops[(rank, op)]
            if self.buffer[(group, peer, rank)].pop(seq, None) is not None:
                arrived.add((rank, op))
        self.gloo_recvs -= arrived
        self.done |= arrived
        return bool(arrived)

    def blocked_on(self, rank) -> str:
        trace = self.traces[rank]
        if self.pc[rank] < len(trace):
            kind, peer, group, nbytes, seq = self.ops[(rank, trace[self.pc[rank]][1])]
            return f"waits at event {self.pc[rank]}: {kind} #{seq} {'to' if kind == 'send' else 'from'} " \
                   f"rank {peer} on {group} ({nbytes} B)"
        heads = [f"{self.ops[(rank, s[0])][0]} to/from {p} on {g}" for (r, g, p), s in self.streams.items()
                 if r == rank and s]
        return f"host done, stream heads stuck: {heads}" if heads else ""


class TraceRecorder:
    """Stands in for ``torch.distributed`` in parallel/link.py: forwards, and records every op.

    ``names`` maps id(group) to a name ("control", "reverse"); the default group is "default".
    """

    def __init__(self, real_dist, names: dict[int, str]):
        self._dist, self.names, self.events, self._next = real_dist, names, [], 0

    def __getattr__(self, name):
        return getattr(self._dist, name)

    def isend(self, tensor, dst, group=None):
        return self._record("send", self._dist.isend(tensor, dst, group=group), dst, group, tensor)

    def irecv(self, tensor, src, group=None):
        return self._record("recv", self._dist.irecv(tensor, src, group=group), src, group, tensor)

    def _record(self, kind, work, peer, group, tensor):
        op, self._next = self._next, self._next + 1
        name = "default" if group is None else self.names.get(id(group), "other")
        self.events.append((kind, op, peer, name, tensor.numel() * tensor.element_size()))
        return _RecordedWork(work, op, self.events)


class _RecordedWork:
    def __init__(self, work, op, events):
        self._work, self.op, self._events = work, op, events

    def wait(self, *args):
        """NCCL's stream-ordered ``wait()`` is replayed as a timed host wait: gloo's ``wait()``
        without a timeout never returns for point-to-point work (torch 2.13)."""
        self._events.append(("wait", self.op))
        return self._work.wait(*(args or (timedelta(seconds=60),)))

    def is_completed(self):
        return self._work.is_completed()
