"""The builtin SmolLM2-135M-Instruct GGUF -> HF folder -> megatron keys (slow: one ~30-45 s GGUF load)."""

from __future__ import annotations

import pytest
import torch
import transformers

from spd_megatron.convert import sources
from spd_megatron.convert.hf_mcore import hf_to_mcore, mcore_to_hf
from spd_megatron.target.arch import arch_from_hf_config


@pytest.mark.slow
def test_materialize_builtin_smollm2(tmp_path):
    out = sources.materialize_hf_folder("smollm2-135m-instruct", tmp_path / "smollm2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp folder left behind

    hf_sd, config, tokenizer = sources.load_hf_state_dict(out)
    arch = arch_from_hf_config(config)
    assert (arch.family, arch.num_layers) == ("llama", 30)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (9, 3, 64)
    assert arch.tie_word_embeddings and arch.rope_theta == 100000.0 and arch.vocab_size == 49152
    assert "lm_head.weight" not in hf_sd
    back = mcore_to_hf(hf_to_mcore(hf_sd, arch), arch)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    # The GGUF q/k un-permutation must be right, or the model would not answer sensibly.
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(new)
    assert sources.materialize_hf_folder("smollm2-135m-instruct", out) == out  # cached: no reload
