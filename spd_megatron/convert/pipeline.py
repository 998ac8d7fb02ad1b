"""HF -> our checkpoint, and back: the steps behind tools/convert_hf.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from spd_megatron.convert.checkpoint import read_full_state_dict, read_record, save_checkpoint
from spd_megatron.convert.hf_mcore import hf_to_mcore, mcore_to_hf
from spd_megatron.convert.sources import load_hf_state_dict, resolve_source, save_hf_folder
from spd_megatron.target.arch import ArchSpec, arch_from_hf_config

log = logging.getLogger(__name__)


def eos_token_ids(folder: Optional[Path], tokenizer: Any, hf_config: Any) -> list[int]:
    """Every id that ends a turn: generation_config's eos (int or list) plus the tokenizer's."""
    ids: list[int] = []
    gen = Path(folder) / "generation_config.json" if folder else None
    candidates = [getattr(hf_config, "eos_token_id", None)]
    if gen is not None and gen.is_file():
        candidates.append(json.loads(gen.read_text()).get("eos_token_id"))
    candidates.append(getattr(tokenizer, "eos_token_id", None))
    for value in candidates:
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def convert_hf_to_checkpoint(src: str | Path, out_dir: str | Path, dtype: str = "float32",
                             show_progress: bool = True) -> Path:
    """Convert an HF folder / GGUF file / builtin name into an spd_megatron checkpoint."""
    resolve_source(src)  # a wrong path fails here, in one line, before any progress output
    with tqdm(total=3, desc="convert", disable=not show_progress, unit="step") as steps:
        steps.set_postfix_str(f"reading {src}")
        hf_sd, hf_config, tokenizer = load_hf_state_dict(src)
        arch = arch_from_hf_config(hf_config)
        steps.update()
        steps.set_postfix_str("mapping to megatron names")
        mc_sd = hf_to_mcore(hf_sd, arch)
        steps.update()
        steps.set_postfix_str(f"writing {out_dir}")
        folder = Path(src) if Path(src).is_dir() else None
        extra = {"source": str(src), "eos_token_ids": eos_token_ids(folder, tokenizer, hf_config),
                 "hf_config": hf_config.to_dict()}
        out = save_checkpoint(out_dir, mc_sd, arch, dtype, tokenizer, extra)
        steps.update()
    return out


def convert_checkpoint_to_hf(ckpt_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write an HF folder (config, safetensors, tokenizer) back from an spd_megatron checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    record = read_record(ckpt_dir)
    arch = ArchSpec.from_dict(record["arch"])
    hf_cfg_dict = dict(record["hf_config"])
    model_type = hf_cfg_dict.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **hf_cfg_dict)
    hf_sd = mcore_to_hf(read_full_state_dict(ckpt_dir), arch)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir), local_files_only=True)
    return save_hf_folder(hf_sd, hf_config, tokenizer, out_dir, overwrite=overwrite)


def hf_folder(model_cfg: Any, ckpt: str | Path, export_dir: str | Path) -> Path:
    """The target as a Hugging Face folder: the builtin model's, or ``ckpt`` exported once into
    ``export_dir`` (for HF baselines and self-distillation on the same weights)."""
    if not model_cfg.checkpoint:
        from spd_megatron.convert.builtin import builtin_hf_folder

        return builtin_hf_folder(model_cfg.builtin, model_cfg.cache_dir)
    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        convert_checkpoint_to_hf(ckpt, export_dir, overwrite=True)
    return export_dir
