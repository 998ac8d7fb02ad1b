"""CUDA-graph decode steps on a GPU: one captured graph per stage serves every position and
equals the eager step (fp32 local spec tightly, bf16 TE spec within bf16 tolerance)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from gpu_helpers import PROMPT, STEPS, decode_logits, gpu_engine, needs_cuda, rel_err, te_available

pytestmark = [pytest.mark.gpu, needs_cuda]


def graph_vs_eager(ckpt, **overrides):
    engine = gpu_engine(ckpt, model__cuda_graphs=True, **overrides)
    graphs = engine.stage.decode_graphs
    assert graphs is not None
    engine.stage.decode_graphs = None
    eager = decode_logits(engine.stage, PROMPT, STEPS)
    engine.stage.decode_graphs = graphs
    replayed = decode_logits(engine.stage, PROMPT, STEPS)
    assert graphs.disabled is None, graphs.disabled
    assert len(graphs.graphs) == 1  # one capture, replayed at every position
    return replayed, eager


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral_window"])
def test_graph_step_equals_eager_step_fp32(tiny_models, family):
    replayed, eager = graph_vs_eager(tiny_models[family][1], model__layer_spec="local")
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["local", "transformer_engine"])
def test_graph_step_equals_eager_step_bf16(bf16_models, spec):
    if spec == "transformer_engine" and not te_available():
        pytest.skip("Transformer Engine is not installed")
    replayed, eager = graph_vs_eager(bf16_models["llama"], model__layer_spec=spec, model__dtype="bfloat16")
    assert rel_err(replayed, eager) < 2e-2


def test_pdm_graph_step_equals_eager_step(tiny_models):
    """draft.cuda_graphs: one graph per row count (1, 2, 3 for n = 2), equal to the eager PDM."""
    from helpers import pdm_cycles

    from spd_megatron.convert.checkpoint import read_arch
    from spd_megatron.draft.cuda_graphs import make_pdm_graphs
    from spd_megatron.draft.pdm import PDMConfig, PDMDraft, PipelineDraftModule

    engine = gpu_engine(tiny_models["llama"][1])  # the process group and megatron's groups
    arch = read_arch(tiny_models["llama"][1])
    torch.manual_seed(1)
    module = PipelineDraftModule(PDMConfig([2, 2], [0, 2, 4], num_layers=2, target=arch.to_dict()),
                                 arch, max_seq_len=48).to(engine.stage.device).eval()
    eager = pdm_cycles(PDMDraft(module), arch.hidden_size)
    graphs = make_pdm_graphs(module, 1, "nccl")
    replayed = pdm_cycles(PDMDraft(module, graphs), arch.hidden_size)
    assert graphs.disabled is None, graphs.disabled
    assert sorted(graphs.graphs) == [1, 2, 3]
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-5)
    rows = torch.randn(3, 1, arch.hidden_size, device=module.head.weight.device)  # [R, 1, h]
    with torch.inference_mode(), no_host_sync():  # a replayed PDM step never waits on the host
        logits = graphs.step(rows, module.cache.length)
    assert logits.shape == (arch.vocab_size,)


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call torch makes inside raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_replayed_stage_step_does_not_synchronise_the_host(tiny_models):
    """A captured step, inputs already on the GPU: no host synchronisation (the steady cycle's only
    ones are the verdict's argmax and the draft token, outside the stage step)."""
    engine = gpu_engine(tiny_models["llama"][1], model__layer_spec="local", model__cuda_graphs=True)
    stage, device = engine.stage, engine.stage.device
    tokens = [torch.tensor([[t]], device=device) for t in STEPS]  # [1, 1] each
    with torch.inference_mode():
        stage.forward(0, token_ids=torch.tensor([PROMPT], device=device))
        stage.forward(len(PROMPT), token_ids=tokens[0])  # the capture (it synchronises)
        with no_host_sync():
            for i, token in enumerate(tokens[1:], start=1):
                out = stage.forward(len(PROMPT) + i, token_ids=token)
    assert stage.decode_graphs.disabled is None, stage.decode_graphs.disabled
    assert out.shape[-1] == engine.arch.vocab_size
