"""--verify: run the converted checkpoint and the HF original on one prompt, compare logits."""

from __future__ import annotations

from pathlib import Path

import torch

from spd_megatron.config import SPDConfig
from spd_megatron.convert.sources import resolve_source
from spd_megatron.eval.prompts import DEFAULT_PROMPT, encode_prompt


def load_hf_model(src: str | Path, dtype: torch.dtype = torch.float32):
    """The HF reference model for a source (folder, GGUF file or builtin name)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(src)
    kwargs = {"gguf_file": source.gguf_file} if source.is_gguf else {}
    return AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype,
                                                local_files_only=True, **kwargs).eval()


def verify_against_hf(ckpt: str | Path, src: str | Path, prompt: str = DEFAULT_PROMPT) -> float:
    """Max |logit difference| between our single-process stage and HF on ``prompt``."""
    from spd_megatron.convert.checkpoint import read_arch, read_record
    from spd_megatron.engine import build_stage, load_tokenizer
    from spd_megatron.parallel.init import init_parallel, shutdown_parallel

    cfg = SPDConfig()
    cfg.model.checkpoint, cfg.model.dtype = str(ckpt), read_record(ckpt)["dtype"]
    ctx = init_parallel(cfg.parallel)
    try:
        stage = build_stage(cfg, ctx, Path(ckpt), read_arch(ckpt))
        tokenizer = load_tokenizer(Path(ckpt))
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])  # [1, s]
        with torch.inference_mode():
            ours = stage.forward(0, token_ids=ids).float()  # [1, s, V]
            dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
            theirs = load_hf_model(src, dtype)(ids).logits.float()
        return float((ours - theirs).abs().max())
    finally:
        shutdown_parallel()
