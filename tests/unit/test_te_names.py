"""Transformer Engine parameter names <-> our local-spec checkpoint names (CPU; TE is never imported).

The TE model is faked by a module tree with exactly the TE spec's state-dict keys: fused-norm
names, ``_extra_state`` entries, and TE's zero-size placeholder bias.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from spd_megatron.convert.checkpoint import WEIGHTS, load_stage_weights, read_arch, read_full_state_dict
from spd_megatron.convert.shard import global_to_local_key, shard_for_tp
from spd_megatron.convert.te_names import (
    checkpoint_key_for,
    local_to_te,
    normalize_to_local,
    te_to_local,
    uses_te_names,
)
from spd_megatron.errors import SPDError

LOCAL_LAYER = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
]
TE_LAYER = [
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv._extra_state",
    "decoder.layers.0.self_attention.core_attention._extra_state",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.self_attention.linear_proj._extra_state",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc1._extra_state",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.layers.0.mlp.linear_fc2._extra_state",
]


def test_name_maps_are_inverse_and_leave_shared_names_alone():
    assert local_to_te("decoder.layers.7.input_layernorm.weight") == \
        "decoder.layers.7.self_attention.linear_qkv.layer_norm_weight"
    assert local_to_te("decoder.layers.7.pre_mlp_layernorm.weight") == \
        "decoder.layers.7.mlp.linear_fc1.layer_norm_weight"
    for key in LOCAL_LAYER + ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                              "output_layer.weight", "decoder.layers.3.self_attention.q_layernorm.weight"]:
        assert te_to_local(local_to_te(key)) == key
    assert local_to_te("decoder.layers.0.self_attention.linear_qkv.bias") == \
        "decoder.layers.0.self_attention.linear_qkv.bias"
    assert te_to_local("decoder.layers.0.mlp.linear_fc1._extra_state") is None


def test_te_key_list_maps_onto_the_local_key_list():
    assert uses_te_names(TE_LAYER) and not uses_te_names(LOCAL_LAYER)
    mapped = [checkpoint_key_for(k, set(LOCAL_LAYER)) for k in TE_LAYER]
    assert sorted(k for k in mapped if k is not None) == sorted(LOCAL_LAYER)
    assert sum(k is None for k in mapped) == 5  # the _extra_state entries
    # and the other way round: a checkpoint written with TE names fills a local-spec model
    assert [checkpoint_key_for(k, set(TE_LAYER)) for k in LOCAL_LAYER] == [
        k for k in TE_LAYER if not k.endswith("_extra_state")]
    assert checkpoint_key_for("decoder.layers.1.input_layernorm.weight", set(LOCAL_LAYER)) is None


def test_normalize_to_local_drops_extra_state():
    state = {k: i for i, k in enumerate(TE_LAYER)}
    assert sorted(normalize_to_local(state)) == sorted(LOCAL_LAYER)


# ---- the loader on a fake TE-named model ------------------------------------------------------
class _Extra(nn.Module):
    """A leaf with TE's ``_extra_state`` (an opaque object in the state dict)."""

    def get_extra_state(self):
        return torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


def module_from_keys(shapes: dict[str, tuple]) -> nn.Module:
    """A module tree whose state dict has exactly ``shapes`` (``_extra_state`` keys included)."""
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Extra())
            node = getattr(node, part)
        if leaf != "_extra_state":
            node.register_parameter(leaf, nn.Parameter(torch.full(shape, float("nan"))))
    return root


def _te_model_for(ckpt, layers: range, tp: int) -> tuple[nn.Module, dict[str, str]]:
    """A fake TE stage holding ``layers``; returns it and model key -> checkpoint key."""
    arch = read_arch(ckpt)
    shapes, origin = {}, {}
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        for name in f.keys():
            if name.startswith("decoder.layers."):
                index = int(name.split(".")[2])
                if index not in layers:
                    continue
                key = local_to_te(global_to_local_key(name, layers.start))
            else:
                key = name
            shapes[key] = tuple(shard_for_tp(name, f.get_slice(name), arch, 0, tp).shape)
            origin[key] = name
    for key in list(shapes):
        if key.endswith((".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight", ".linear_fc2.weight")):
            shapes[key.rsplit(".", 1)[0] + "._extra_state"] = ()
        if key.endswith("linear_proj.weight"):
            shapes[key.rsplit(".", 1)[0] + ".bias"] = (0,)  # TE's empty bias placeholder
    return module_from_keys(shapes), origin


@pytest.mark.parametrize("tp", [1, 2])
def test_load_stage_weights_fills_a_te_named_stage(tiny_models, tp):
    ckpt = tiny_models["qwen3"][1]  # qk-norm too
    arch = read_arch(ckpt)
    layers = range(2, 4)  # the second half: global -> local renames as well
    model, origin = _te_model_for(ckpt, layers, tp)
    state = model.state_dict()
    assert any(k.endswith("layer_norm_weight") for k in state) and any(k.endswith("_extra_state") for k in state)
    with torch.no_grad():
        load_stage_weights(ckpt, model, arch, layers.start, tp_rank=0, tp_size=tp)
    full = read_full_state_dict(ckpt)
    for key, param in model.named_parameters():
        if param.numel() == 0:
            continue
        expected = shard_for_tp(origin[key], full[origin[key]], arch, 0, tp)
        assert torch.equal(param, expected), key
    fused = dict(model.named_parameters())["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    assert torch.equal(fused, full["decoder.layers.2.input_layernorm.weight"])


def test_load_stage_weights_names_the_missing_tensor(tiny_models):
    ckpt = tiny_models["llama"][1]
    model = module_from_keys({"decoder.layers.0.mlp.linear_fc9.layer_norm_weight": (64,)})
    with pytest.raises(SPDError, match="linear_fc9"):
        load_stage_weights(ckpt, model, read_arch(ckpt), 0, 0, 1)
