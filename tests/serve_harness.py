"""Start and stop ``torchrun -m spd_megatron.serve`` for the server tests (127.0.0.1 only).

Every wait is bounded; a server is always killed (its whole process group) when a test is done.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 150.0  # imports + model load of every rank, on 2 shared cores
EXIT_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``torchrun --nproc-per-node N -m spd_megatron.serve`` in its own process group."""

    def __init__(self, overrides: list[str], log_path: Path, nproc: int = 2) -> None:
        self.port = free_port()
        self.log_path = log_path
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "spd_megatron.serve", "--config", "tiny",
               f"serve.port={self.port}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"server not ready after {timeout_s:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def rank_pids(self) -> dict[int, int]:
        """Global rank -> pid of each worker process."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env = child.environ()
                if "spd_megatron.serve" in " ".join(child.cmdline()) and "RANK" in env:
                    out[int(env["RANK"])] = child.pid
            except psutil.Error:
                continue
        return out

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """The launcher's exit code; AssertionError (after a kill) if any process outlives the timeout."""
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running {timeout_s:.0f} s later:\n{self.output()[-3000:]}") from None
        return code

    def metric(self, name: str) -> float:
        """One sample of /metrics (0 when absent), e.g. ``spd:num_requests_waiting``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def kill(self) -> None:
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the exit timeout."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
