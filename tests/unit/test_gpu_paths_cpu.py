"""The GPU-only switches, as far as a CPU can check them: config checks, backend choice, device
threading on the CPU path, the TE mask rule and the FP8 recipe (no Transformer Engine import)."""

from __future__ import annotations

import sys

import pytest
import torch

from spd_megatron.config import load_config
from spd_megatron.errors import SPDError
from spd_megatron.parallel.init import MIXED_BACKEND, comm_devices, local_world_size, pick_backend
from spd_megatron.parallel.link import Header, Op, StageLink
from spd_megatron.target.fp8 import (
    FP8_RECIPE,
    fp8_config_fields,
    fp8_recipe_fields,
    installed_te_version,
    te_support_line,
)
from spd_megatron.target.kv_cache import causal_mask
from spd_megatron.target.specs import resolve_layer_spec_name
from spd_megatron.target.te_attention import te_mask_choice


def test_cuda_graphs_config_is_refused_on_cpu_and_with_fp8():
    assert load_config(None, []).model.cuda_graphs is False
    with pytest.raises(SPDError, match="cuda_graphs=true needs a CUDA GPU"):
        load_config(None, ["model.cuda_graphs=true"])
    with pytest.raises(SPDError, match="does not work with model.fp8"):
        load_config(None, ["model.cuda_graphs=true", "model.fp8=true"])


def test_fp8_needs_the_te_spec_which_cpu_never_resolves():
    from spd_megatron.engine import check_fp8_spec

    cfg = load_config(None, ["model.fp8=true"])  # layer_spec=auto
    assert resolve_layer_spec_name("auto") == "lean"
    with pytest.raises(SPDError, match="resolved to lean"):
        check_fp8_spec(cfg, resolve_layer_spec_name(cfg.model.layer_spec))
    with pytest.raises(SPDError, match="needs a CUDA GPU with Transformer Engine"):
        resolve_layer_spec_name("transformer_engine")
    assert "transformer_engine" not in sys.modules  # never imported on CPU


def test_backend_choice():
    assert pick_backend("auto", cuda=False, gpus=0, local_procs=2) == "gloo"
    assert pick_backend("auto", cuda=True, gpus=8, local_procs=8) == "nccl"
    assert pick_backend("auto", cuda=True, gpus=1, local_procs=4) == "gloo"  # stages share one GPU
    assert pick_backend("auto", cuda=True, gpus=1, local_procs=0) == "nccl"  # launcher did not say
    assert pick_backend("gloo", cuda=True, gpus=8, local_procs=8) == "gloo"
    with pytest.raises(SPDError, match="needs CUDA GPUs"):
        pick_backend("nccl", cuda=False, gpus=0, local_procs=1)
    with pytest.raises(SPDError, match="one GPU per model process"):
        pick_backend("nccl", cuda=True, gpus=1, local_procs=2)
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert local_world_size({}) == 0


def test_dedicated_draft_on_a_full_node_keeps_nccl_for_the_model_ranks():
    """TP x PP + 1 processes on TP x PP GPUs: the model ranks keep NCCL, only the draft rank's
    messages go through host memory (gloo); every node picks the same backend string."""
    full, other_node = dict(cuda=True, gpus=8, local_procs=9), dict(cuda=True, gpus=8, local_procs=8)
    assert pick_backend("auto", **full, extra_ranks=1) == MIXED_BACKEND
    assert pick_backend("auto", **other_node, extra_ranks=1) == MIXED_BACKEND  # nodes agree
    assert pick_backend("nccl", **full, extra_ranks=1) == MIXED_BACKEND
    assert pick_backend("auto", **full) == "gloo"  # nine model ranks on eight GPUs
    assert pick_backend("auto", cuda=True, gpus=4, local_procs=9, extra_ranks=1) == "gloo"
    assert pick_backend("auto", cuda=False, gpus=0, local_procs=3, extra_ranks=1) == "gloo"
    gpu = torch.device("cuda", 0)
    assert comm_devices(MIXED_BACKEND, gpu, False, 8) == (gpu, frozenset({8}))  # model rank
    assert comm_devices(MIXED_BACKEND, gpu, True, 8) == (torch.device("cpu"), frozenset())  # draft rank
    assert comm_devices("nccl", gpu, False, None) == (gpu, frozenset())
    assert comm_devices("gloo", gpu, False, 8) == (torch.device("cpu"), frozenset())
    link = StageLink(0, None, 1, 0, 1, 8, torch.float32, 1, device="cuda", cpu_peers={8})
    assert link._device_for(8).type == "cpu" and link._device_for(1).type == "cuda"
    assert link._nccl_with(1) and not link._nccl_with(8)


def test_cpu_path_keeps_tensors_on_cpu():
    link = StageLink(0, None, 1, 0, 1, hidden_size=8, dtype=torch.float32, timeout_s=1)
    assert link.device == torch.device("cpu")
    header = Header(Op.STEP, 3, 1, 7, 2)
    assert header.to_tensor().device.type == "cpu"
    assert Header.from_tensor(header.to_tensor(link.device)) == header
    mask = causal_mask(2, 3, device=torch.device("cpu"))
    assert mask.device.type == "cpu" and torch.equal(mask, causal_mask(2, 3))


def te_reference_mask(mask_type: str, window: tuple, sq: int, sk: int) -> torch.Tensor:
    """TE's documented rule (DotProductAttention docstring), True = masked: query i sees keys
    [i + sk - sq - left, i + sk - sq + right] for bottom-right types, [i - left, i + right] else."""
    i = torch.arange(sq).view(-1, 1)  # [sq, 1]
    j = torch.arange(sk).view(1, -1)  # [1, sk]
    diagonal = i + (sk - sq if mask_type.endswith("bottom_right") else 0)
    left, right = window
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= diagonal - left
    if right >= 0:
        allowed &= j <= diagonal + right
    return ~allowed


def test_te_mask_choice_matches_our_masks_without_arbitrary():
    """Every mask a stage builds (prompt chunks at any offset, verify rows, sliding windows) is
    TE's causal_bottom_right with window (w - 1, 0): the mask tensor is dropped, so TE may use
    flash/cuDNN attention. Only a graph step over the static cache stays arbitrary."""
    from megatron.core.transformer.enums import AttnMaskType

    for window in (None, 1, 3, 8):
        for start in (0, 1, 4, 9):
            for count in (1, 2, 5):
                mask = causal_mask(start, count, window)
                megatron_type = AttnMaskType.causal if start == 0 else AttnMaskType.no_mask
                kind, te_window, keep = te_mask_choice(mask is not None, megatron_type, window)
                reference = te_reference_mask(kind.name, te_window, count, start + count)
                expected = torch.zeros_like(reference) if mask is None else mask[0, 0]
                assert torch.equal(reference, expected), (window, start, count, kind, te_window)
                assert not keep and kind != AttnMaskType.arbitrary
    graph_step = te_mask_choice(True, AttnMaskType.arbitrary, 4)
    assert graph_step == (AttnMaskType.arbitrary, (-1, -1), True)
    assert te_mask_choice(False, AttnMaskType.no_mask) == (AttnMaskType.no_mask, (-1, -1), False)


def test_fp8_recipe_is_current_scaling_and_refuses_old_te():
    """Delayed scaling updates its scales only with grad enabled (TE autocast_exit), never in
    inference mode: FP8 uses current scaling (megatron 'tensorwise', TE >= 2.2) or refuses."""
    assert fp8_config_fields(False) == {}
    for version in ("2.2.0.dev0", "2.4.0", "2.11.0+abc", "2.12.0"):
        assert fp8_recipe_fields(version) == {"fp8": "hybrid", "fp8_recipe": "tensorwise"}
    assert fp8_config_fields(True, te_version="2.9.0") == FP8_RECIPE
    with pytest.raises(SPDError, match="needs Transformer Engine >= 2.2 .* found 2.1.0"):
        fp8_recipe_fields("2.1.0")
    with pytest.raises(SPDError, match="needs Transformer Engine \\(pip install"):
        fp8_recipe_fields(None)
    if installed_te_version() is None:  # CPU: no TE, so model.fp8 fails with one clear line
        with pytest.raises(SPDError, match="needs Transformer Engine"):
            fp8_config_fields(True)
    from megatron.core.enums import Fp8Recipe

    assert Fp8Recipe(FP8_RECIPE["fp8_recipe"]) == Fp8Recipe.tensorwise  # megatron knows the name
    assert te_support_line("2.10.0+abc").endswith("available; within megatron-core 0.16.1's tested range 2.9-2.11")
    assert "no FP8 (needs >= 2.2); OUTSIDE" in te_support_line("2.1.0")
    assert "OUTSIDE" in te_support_line("2.4.0+3cd6870") and "not installed" in te_support_line(None)


def test_ring_rows_are_not_posted_ahead_of_nccl_sends_back_to_stage0():
    """On NCCL a pair's ops run in order on one stream: stage 1 must not post its next row ahead
    of the anchors/verdicts it sends back to stage 0 (a deadlock); gloo and stages >= 2 may."""
    control = object()  # stands for the gloo header group; the constructor does not communicate

    def link(rank, prev, device):
        return StageLink(rank, prev, None, 0, 2, 8, torch.float32, 1, device=device, control_group=control)

    assert link(1, 0, "cpu").preposts_rows and link(2, 1, "cpu").preposts_rows
    assert not link(1, 0, "cuda").preposts_rows  # prev is stage 0
    assert link(2, 1, "cuda").preposts_rows
    assert not StageLink(1, 0, None, 0, 1, 8, torch.float32, 1).preposts_rows  # no control group
    reverse = object()  # with sends to lower ranks on their own group, stage 1 may post ahead too
    with_reverse = StageLink(1, 0, None, 0, 2, 8, torch.float32, 1, device="cuda", control_group=control,
                             reverse_group=reverse)
    assert with_reverse.preposts_rows
    assert with_reverse._group_to(0) is reverse and with_reverse._group_from(0) is None
    assert with_reverse._group_to(2) is None and with_reverse._group_from(2) is reverse


def test_nccl_payload_waits_do_not_block_the_host():
    """NCCL's wait(timeout) polls on the host until the transfer ends; wait() only orders the
    stream. Payload receives (their header already came over gloo) use the latter on NCCL."""

    class Work:
        def __init__(self):
            self.calls = []

        def wait(self, *args):
            self.calls.append(args)

    def waits(device, control):
        link = StageLink(1, 0, None, 0, 1, 8, torch.float32, 5, device=device, control_group=control)
        work = Work()
        link._wait_payload(work, "payload from", 0)
        return work.calls

    assert waits("cuda", object()) == [()]  # stream-ordered
    assert waits("cpu", object())[0][0].total_seconds() == 5  # gloo: a host wait with the timeout
    assert waits("cuda", None)[0][0].total_seconds() == 5  # headers on NCCL too: timed host waits


def _two_tp_ranks_capture(monkeypatch, names):
    """capture_checked on two threads standing for two TP ranks; a stub agree() is an all-reduce
    MIN. "bad" fails its capture, "off" captures but its replay differs from the eager step."""
    import threading

    from spd_megatron.target import cuda_graphs

    replays = {name: 0 for name in names}

    class FakeGraph:
        def __init__(self, name):
            self.name = name

        def replay(self):  # would run the captured TP all-reduce
            replays[self.name] += 1

    def fake_capture(step, pool):
        name = step()
        if name == "bad":
            raise RuntimeError("operation not permitted when stream is capturing")
        return FakeGraph(name), torch.ones(2) * (2 if name == "off" else 1), torch.ones(2)

    monkeypatch.setattr(cuda_graphs, "_capture_graph", fake_capture)
    barrier, flags, outcome = threading.Barrier(len(names)), {}, {}

    def agree(name):
        def fn(ok):
            flags[name] = ok
            barrier.wait(timeout=10)
            result = all(flags.values())
            barrier.wait(timeout=10)
            return result
        return fn

    def rank(name):
        try:
            cuda_graphs.capture_checked(lambda: name, None, agree(name))
            outcome[name] = "graph"
        except RuntimeError as err:
            outcome[name] = str(err)

    threads = [threading.Thread(target=rank, args=(n,)) for n in names]
    [t.start() for t in threads]
    [t.join(timeout=20) for t in threads]
    return outcome, replays


def test_tp_ranks_agree_on_graphs_when_one_rank_fails(monkeypatch):
    """One TP rank failing capture (or its replay check) makes every rank of the stage fall back
    to eager steps, and no rank replays a captured all-reduce its peer would not join."""
    from spd_megatron.target import cuda_graphs

    outcome, replays = _two_tp_ranks_capture(monkeypatch, ["ok", "bad"])
    assert outcome == {"ok": "capture failed on a tensor-parallel peer",
                       "bad": "operation not permitted when stream is capturing"}
    assert replays == {"ok": 0, "bad": 0}
    outcome, replays = _two_tp_ranks_capture(monkeypatch, ["ok", "off"])
    assert outcome["ok"] == "replay check failed on a tensor-parallel peer"
    assert outcome["off"].startswith("graph replay differs")
    assert replays == {"ok": 1, "off": 1}  # the check replay ran on both: its collectives matched
    assert _two_tp_ranks_capture(monkeypatch, ["ok", "ok2"])[0] == {"ok": "graph", "ok2": "graph"}
    assert cuda_graphs.agree_across(None, torch.device("cpu"))(True) is True
