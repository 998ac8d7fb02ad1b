"""CUDA-graph decode steps on a GPU: one captured graph per stage serves every position and
equals the eager step (fp32 local spec tightly, bf16 TE spec within bf16 tolerance)."""

from __future__ import annotations

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
