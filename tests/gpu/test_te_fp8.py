"""Transformer Engine layer spec and FP8 on a GPU, against the local spec (bf16 tolerances).

Covers the TE parameter-name mapping at load time, TE attention with our explicit masks (chunked
prefill at an offset, a sliding window) and FP8 with delayed scaling (calibrated weights, padded
one-token rows).
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import PROMPT, STEPS, cosine, decode_logits, full_logits, gpu_engine, needs_cuda, needs_te, rel_err

from spd_megatron.convert.te_names import uses_te_names

pytestmark = [pytest.mark.gpu, needs_cuda, needs_te]
BF16 = dict(model__dtype="bfloat16")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral_window"])
def test_te_spec_logits_match_local_spec(bf16_models, family):
    ckpt = bf16_models[family]
    local = gpu_engine(ckpt, model__layer_spec="local", **BF16)
    ref_full, ref_decode = full_logits(local.stage, PROMPT + STEPS), decode_logits(local.stage, PROMPT, STEPS)
    te = gpu_engine(ckpt, model__layer_spec="transformer_engine", **BF16)
    assert uses_te_names(te.stage.model.state_dict())  # fused norms: the name map was needed
    full, decode = full_logits(te.stage, PROMPT + STEPS), decode_logits(te.stage, PROMPT, STEPS)
    assert rel_err(full, ref_full) < 3e-2
    assert rel_err(decode, ref_decode) < 3e-2
    assert rel_err(decode, full[len(PROMPT):]) < 3e-2  # KV-cached TE path = one full pass


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need compute capability 8.9+ (Ada, Hopper, Blackwell)")
def test_fp8_logits_close_to_bf16(bf16_models):
    ckpt = bf16_models["llama"]
    bf16 = gpu_engine(ckpt, model__layer_spec="transformer_engine", **BF16)
    ref_full, ref_decode = full_logits(bf16.stage, PROMPT + STEPS), decode_logits(bf16.stage, PROMPT, STEPS)
    fp8 = gpu_engine(ckpt, model__layer_spec="transformer_engine", model__fp8=True, **BF16)
    full, decode = full_logits(fp8.stage, PROMPT + STEPS), decode_logits(fp8.stage, PROMPT, STEPS)
    for got, ref in ((full, ref_full), (decode, ref_decode)):
        assert torch.isfinite(got).all()
        assert cosine(got, ref) > 0.97, cosine(got, ref)
        assert rel_err(got, ref) < 0.25, rel_err(got, ref)
