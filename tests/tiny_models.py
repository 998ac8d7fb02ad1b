"""Tiny random Hugging Face models (no download), with a byte-level tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 260  # 256 byte symbols + 4 specials; divisible by TP 1, 2, 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=258, pad_token_id=259)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=50000.0, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "llama3_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
}


def byte_tokenizer():
    """A fast tokenizer over the 256 byte symbols plus the chat specials (ids 256..259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[3], unk_token=SPECIALS[0])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_hf(family: str, out_dir: str | Path, seed: int = 0, std: float = 0.2, **overrides) -> Path:
    """Write a random tiny HF model folder of the given family (see FAMILIES) and return it."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    kwargs = {**BASE, **extra, **overrides}
    config = getattr(transformers, cfg_cls)(**kwargs)
    config.initializer_range = std
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms too, so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = Path(out_dir)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
