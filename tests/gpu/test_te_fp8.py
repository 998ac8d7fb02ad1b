"""Transformer Engine layer spec and FP8 on a GPU, against the local spec (bf16 tolerances).

Covers the TE parameter-name mapping at load time, TE attention with our masks as TE mask types
(chunked prefill at an offset, a sliding window: causal_bottom_right, never the unfused backend)
and FP8 with padded one-token rows. FP8 uses current scaling (target/fp8.py): checked on the config megatron hands TE, and against
bf16 on the real builtin SmolLM2 weights and real prompts (logit error, greedy agreement), where
delayed scaling stuck at scale 1.0 would clip the MLP's outliers.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import PROMPT, STEPS, cosine, decode_logits, full_logits, gpu_engine, needs_cuda, needs_te, rel_err
from helpers import tiny_config

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


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_te_prefill_chunks_and_windows_avoid_unfused_attention(bf16_models, family):
    """Chunks at an offset and sliding windows run on flash/cuDNN attention: TE's unfused backend
    (the full score matrix in fp32) is never called for them."""
    te = gpu_engine(bf16_models[family], model__layer_spec="transformer_engine", **BF16)
    calls = []
    for module in te.stage.model.modules():
        unfused = getattr(module, "unfused_attention", None)
        if unfused is not None:
            original = unfused.forward
            unfused.forward = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    decode_logits(te.stage, PROMPT, STEPS)
    assert not calls, f"unfused attention ran {len(calls)} times"


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


needs_fp8 = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                               reason="FP8 GEMMs need compute capability 8.9+ (Ada, Hopper, Blackwell)")


@needs_fp8
def test_fp8_recipe_is_current_scaling(bf16_models):
    from megatron.core.fp8_utils import get_fp8_recipe
    from transformer_engine.common.recipe import Float8CurrentScaling

    fp8 = gpu_engine(bf16_models["llama"], model__layer_spec="transformer_engine", model__fp8=True, **BF16)
    assert isinstance(get_fp8_recipe(fp8.stage.model.config), Float8CurrentScaling)


@needs_fp8
def test_fp8_tracks_bf16_on_real_weights_and_prompts():
    """Builtin SmolLM2 (converted on first use), three MT-bench prompts, teacher-forced logits."""
    from spd_megatron.eval.prompts import encode_prompt, read_prompts_file

    from spd_megatron.engine import resolve_checkpoint
    from spd_megatron.errors import SPDError

    real = dict(model__layer_spec="transformer_engine", model__max_seq_len=512, **BF16)
    try:
        resolve_checkpoint(tiny_config("", **real))  # converts the builtin model once
    except SPDError as err:
        pytest.skip(f"builtin model not available here: {err}")
    bf16 = gpu_engine("", **real)
    tokenizer = bf16.tokenizer
    prompts = [encode_prompt(tokenizer, text)[:200] for text in read_prompts_file("mt_bench", limit=3)]
    refs = [full_logits(bf16.stage, ids) for ids in prompts]
    fp8 = gpu_engine("", model__fp8=True, **real)
    for ids, ref in zip(prompts, refs):
        got = full_logits(fp8.stage, ids)
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"fp8 vs bf16: {len(ids)} tokens, rel err {rel_err(got, ref):.3f}, "
              f"cosine {cosine(got, ref):.4f}, greedy agreement {agree:.3f}")
        assert torch.isfinite(got).all()
        assert cosine(got, ref) > 0.98 and agree > 0.85, (cosine(got, ref), agree)
