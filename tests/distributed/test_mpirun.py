"""``mpirun -np 2 python examples/decode.py``: ranks come from OpenMPI's environment (no mpi4py).

Skipped when ``mpirun`` is not on PATH: CI installs no OS packages. On a machine with OpenMPI
(``apt-get install -y openmpi-bin libopenmpi-dev``) it runs a tiny checkpoint on 2 ranks and
checks the tokens against a single-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = shutil.which("mpirun")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(MPIRUN is None, reason="mpirun is not on PATH (OpenMPI is not installed; "
                                              "apt-get install openmpi-bin libopenmpi-dev to run this)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _decode_args(ckpt, report: Path) -> list[str]:
    return [str(ROOT / "examples" / "decode.py"), "--config", "tiny", f"model.checkpoint={ckpt}",
            "max_new_tokens=8", "report.stream=false", f"report.json={report}"]


def _output_ids(report: Path) -> list[int]:
    return json.loads(report.read_text())["results"][0]["output_ids"]


def test_mpirun_two_ranks_decode_like_one_process(tiny_models, tmp_path):
    ckpt = tiny_models["llama"][1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [MPIRUN, *root, "--oversubscribe", "-np", "2", "-x", f"MASTER_PORT={_free_port()}",
           "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", sys.executable,
           *_decode_args(ckpt, tmp_path / "mpi.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PP=2" in proc.stdout + proc.stderr  # rank 0's stats table: two pipeline stages from OMPI_COMM_WORLD_*
    single = subprocess.run([sys.executable, *_decode_args(ckpt, tmp_path / "one.json")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _output_ids(tmp_path / "mpi.json") == _output_ids(tmp_path / "one.json")
    assert 1 <= len(_output_ids(tmp_path / "mpi.json")) <= 8
