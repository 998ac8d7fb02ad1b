"""How MPI ranks find rank 0 (MASTER_ADDR / MASTER_PORT); no MPI needed.

read_launch_env itself is covered in test_layout_config.py; the real 2-rank mpirun runs (with and
without mpi4py) are in tests/distributed/test_mpirun.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from spd_megatron.errors import SPDError
from spd_megatron.parallel import init
from spd_megatron.parallel.init import (LaunchEnv, master_address, mpi_master_port, mpi_rendezvous,
                                        mpi_spans_nodes, set_mpi_master)

OMPI_2 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPI_ENV = LaunchEnv(rank=1, world_size=2, local_rank=1, launcher="mpi")


class FakeComm:
    """One rank's view of an mpi4py communicator; ``board`` carries rank 0's bcast to the others."""

    def __init__(self, rank: int, hostnames: list, board: dict):
        self.rank, self.hostnames, self.board = rank, hostnames, board

    def Get_rank(self):  # noqa: N802 - mpi4py's name
        return self.rank

    def allgather(self, obj):
        return list(self.hostnames)

    def bcast(self, obj, root=0):
        if self.rank == root:
            self.board["sent"] = obj
        return self.board["sent"]


def test_mpi_master_port_same_for_a_job_different_across_jobs():
    one = mpi_master_port({"PMIX_NAMESPACE": "prterun-vm-1@1"})
    assert one == mpi_master_port({"PMIX_NAMESPACE": "prterun-vm-1@1"})
    assert one != mpi_master_port({"PMIX_NAMESPACE": "prterun-vm-2@1"})
    assert 20000 <= one < 40000
    assert mpi_master_port({}) == 29500


def test_spans_nodes_from_the_local_size():
    assert not mpi_spans_nodes(OMPI_2)
    assert mpi_spans_nodes({**OMPI_2, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    assert mpi_spans_nodes({"PMI_RANK": "0", "PMI_SIZE": "16", "MPI_LOCALNRANKS": "8"})
    assert not mpi_spans_nodes({"PMI_RANK": "0", "PMI_SIZE": "16"})  # launcher does not say: assume one node


def test_master_address_loopback_on_one_host_routed_across_hosts(monkeypatch):
    assert master_address(["n0", "n0", "n0"]) == "127.0.0.1"
    assert master_address(["n0", "n0", "n1"], route=lambda peer: {"n1": "10.0.0.5"}[peer]) == "10.0.0.5"
    # no route found: rank 0's resolved name, unless that is loopback, then the name itself
    monkeypatch.setattr(init.socket, "gethostbyname", lambda host: "10.0.0.7")
    assert master_address(["n0", "n1"], route=lambda peer: None) == "10.0.0.7"
    monkeypatch.setattr(init.socket, "gethostbyname", lambda host: "127.0.1.1")
    assert master_address(["n0", "n1"], route=lambda peer: None) == "n0"


def test_route_address_to_localhost_is_not_offered(monkeypatch):
    assert init.route_address("localhost") is None  # loopback is never an address for other hosts

    def unresolvable(host):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(init.socket, "gethostbyname", unresolvable)  # no DNS lookup in a unit test
    assert init.route_address("node9") is None


def test_mpi_rendezvous_every_rank_gets_rank_0s_choice(monkeypatch):
    monkeypatch.setattr(init.socket, "gethostname", lambda: "n0")
    board: dict = {}
    hosts = ["n0", "n0"]
    addr, port = mpi_rendezvous(FakeComm(0, hosts, board))
    assert addr == "127.0.0.1" and 0 < port < 65536
    assert mpi_rendezvous(FakeComm(1, hosts, board)) == (addr, port)
    assert mpi_rendezvous(FakeComm(0, hosts, {}), master_port="29555") == ("127.0.0.1", 29555)


def test_mpi_rendezvous_error_on_rank_0_reaches_every_rank():
    board: dict = {}
    with pytest.raises(SPDError, match="rank 0 could not pick"):
        mpi_rendezvous(FakeComm(0, ["n0"], board), master_port="notaport")
    with pytest.raises(SPDError, match="rank 0 could not pick"):
        mpi_rendezvous(FakeComm(1, ["n0"], board))


def test_set_mpi_master_given_address_is_kept_and_mpi4py_not_asked():
    env = {**OMPI_2, "MASTER_ADDR": "node0", "PMIX_NAMESPACE": "job7"}
    set_mpi_master(MPI_ENV, env, world=lambda e: pytest.fail("mpi4py asked though MASTER_ADDR is set"))
    assert env["MASTER_ADDR"] == "node0" and env["MASTER_PORT"] == str(mpi_master_port(env))
    env = {**OMPI_2, "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    set_mpi_master(MPI_ENV, env, world=lambda e: None)  # spans nodes, but the address is given
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node0", "1234")


def test_set_mpi_master_through_mpi4py(monkeypatch):
    monkeypatch.setattr(init.socket, "gethostname", lambda: "n0")
    board = {"sent": ("10.1.2.3", 31337)}  # what rank 0 broadcast
    env = {**OMPI_2, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}  # across nodes: fine with mpi4py
    set_mpi_master(MPI_ENV, env, world=lambda e: FakeComm(1, ["n0", "n1"], board))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.1.2.3", "31337")


def test_set_mpi_master_without_mpi4py_one_node_uses_loopback_and_job_port():
    env = {**OMPI_2, "PMIX_NAMESPACE": "job7"}
    set_mpi_master(MPI_ENV, env, world=lambda e: None)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(mpi_master_port(env)))


def test_set_mpi_master_without_mpi4py_across_nodes_names_the_fix():
    env = {**OMPI_2, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    with pytest.raises(SPDError) as err:
        set_mpi_master(MPI_ENV, env, world=lambda e: None)
    message = str(err.value)
    assert "\n" not in message and "mpi4py" in message and "-x MASTER_ADDR=" in message
    assert "MASTER_ADDR" not in env  # nothing half-set


def test_mpi4py_world_ignored_when_it_disagrees_with_the_launcher():
    pytest.importorskip("mpi4py")
    # in a subprocess: importing mpi4py.MPI runs MPI_Init (a singleton world of 1), and the test
    # process later forks gloo ranks, which an initialised MPI does not allow
    code = ("from spd_megatron.parallel.init import LaunchEnv, _mpi4py_world\n"
            "print('world:', _mpi4py_world(LaunchEnv(1, 2, 1, 'mpi')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world: None" in proc.stdout  # the launcher says rank 1 of 2; mpi4py says 0 of 1
    assert "not using it to find rank 0" in proc.stderr
