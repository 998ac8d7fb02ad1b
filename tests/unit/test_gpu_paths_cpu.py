"""The GPU-only switches, as far as a CPU can check them: config checks, backend choice, device
threading on the CPU path, the TE mask rule and the FP8 recipe (no Transformer Engine import)."""

from __future__ import annotations

import sys

import pytest
import torch

from spd_megatron.config import load_config
from spd_megatron.errors import SPDError
from spd_megatron.parallel.init import local_world_size, pick_backend
from spd_megatron.parallel.link import Header, Op, StageLink
from spd_megatron.target.fp8 import FP8_RECIPE, fp8_config_fields, recast_fp8_weights
from spd_megatron.target.kv_cache import causal_mask
from spd_megatron.target.specs import resolve_layer_spec_name
from spd_megatron.target.te_attention import te_mask_type


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
    with pytest.raises(SPDError, match="one GPU per process"):
        pick_backend("nccl", cuda=True, gpus=1, local_procs=2)
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert local_world_size({}) == 0


def test_cpu_path_keeps_tensors_on_cpu():
    link = StageLink(0, None, 1, 0, 1, hidden_size=8, dtype=torch.float32, timeout_s=1)
    assert link.device == torch.device("cpu")
    header = Header(Op.STEP, 3, 1, 7, 2)
    assert header.to_tensor().device.type == "cpu"
    assert Header.from_tensor(header.to_tensor(link.device)) == header
    mask = causal_mask(2, 3, device=torch.device("cpu"))
    assert mask.device.type == "cpu" and torch.equal(mask, causal_mask(2, 3))


def test_te_mask_rule():
    from megatron.core.transformer.enums import AttnMaskType

    mask = causal_mask(4, 2)
    assert te_mask_type(None, AttnMaskType.no_mask) == AttnMaskType.no_mask  # one-token step: fused
    assert te_mask_type(None, AttnMaskType.causal) == AttnMaskType.causal
    assert te_mask_type(mask, AttnMaskType.no_mask) == AttnMaskType.arbitrary  # chunk at offset > 0
    assert te_mask_type(mask, AttnMaskType.causal) == AttnMaskType.arbitrary  # window at offset 0


def test_fp8_recipe_and_weight_recast():
    assert fp8_config_fields(False) == {}
    assert fp8_config_fields(True) == FP8_RECIPE
    assert FP8_RECIPE["fp8"] == "hybrid" and FP8_RECIPE["fp8_recipe"] == "delayed"

    class FakeTELinear(torch.nn.Module):
        is_first_microbatch = False

    model = torch.nn.Sequential(FakeTELinear(), torch.nn.Linear(2, 2), FakeTELinear())
    assert recast_fp8_weights(model) == 2
    assert all(m.is_first_microbatch for m in model if isinstance(m, FakeTELinear))


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
