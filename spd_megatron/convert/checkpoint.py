"""Our checkpoint: Megatron-core parameter names, full (unsharded) tensors, resharded at load.

Layout of a checkpoint folder::

    spd_checkpoint.json      # format version, ArchSpec, dtype, source, EOS ids
    model.safetensors        # megatron local-spec names, GLOBAL layer indices, TP=1 tensors
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   # from the HF source

Why not megatron's dist_checkpointing: it names layers by megatron's own pipeline offsets (which
only know "first/last stage uneven"), every rank (a dedicated draft rank too) must join its
collectives, and its save starts a spawn-context manager that re-imports ``__main__``. Here each
rank opens the file with ``safe_open`` and reads only its own layers and TP slices (mmap), so one
checkpoint loads under any TP x PP and any uneven split, with no communication.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spd_megatron.convert.shard import check_tp_compatible, local_to_global_key, shard_for_tp
from spd_megatron.convert.te_names import checkpoint_key_for, is_extra_state, normalize_to_local
from spd_megatron.errors import SPDError
from spd_megatron.target.arch import ArchSpec
from spd_megatron.target.build import TORCH_DTYPES

RECORD = "spd_checkpoint.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_checkpoint(out_dir: str | Path, mc_sd: dict[str, torch.Tensor], arch: ArchSpec,
                    dtype: str, tokenizer: Any = None, extra: Optional[dict] = None) -> Path:
    """Write a checkpoint folder atomically (a crash never leaves a half-written folder)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in mc_sd.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "spd_megatron"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        record = {"format_version": FORMAT_VERSION, "arch": arch.to_dict(), "dtype": dtype,
                  **(extra or {})}
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
        check_checkpoint(tmp, tokenizer=tokenizer is not None)  # a folder in place is always complete
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_record(ckpt_dir: str | Path) -> dict:
    """The checkpoint's record, with clear errors for a wrong or incomplete folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise SPDError(f"checkpoint {ckpt_dir} does not exist; convert one with tools/convert_hf.py")
    if not (ckpt_dir / RECORD).is_file():
        hint = " (it looks like a Hugging Face model: convert it with tools/convert_hf.py --hf " \
               f"{ckpt_dir} --out DIR)" if (ckpt_dir / "config.json").exists() else ""
        raise SPDError(f"{ckpt_dir} is not an spd_megatron checkpoint: no {RECORD}{hint}")
    record = json.loads((ckpt_dir / RECORD).read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise SPDError(f"checkpoint {ckpt_dir} has format_version {record.get('format_version')}, "
                       f"this spd_megatron reads {FORMAT_VERSION}; re-convert it")
    if not (ckpt_dir / WEIGHTS).is_file():
        raise SPDError(f"checkpoint {ckpt_dir} has no {WEIGHTS}; re-convert it")
    return record


def check_checkpoint(ckpt_dir: str | Path, tokenizer: bool = True) -> None:
    """Raise SPDError unless the folder holds a readable record, the weights and (if asked) a tokenizer."""
    from spd_megatron.convert.sources import has_tokenizer_files

    read_record(ckpt_dir)
    if tokenizer and not has_tokenizer_files(Path(ckpt_dir)):
        raise SPDError(f"checkpoint {ckpt_dir} has no tokenizer files; re-convert it")


def read_arch(ckpt_dir: str | Path) -> ArchSpec:
    return ArchSpec.from_dict(read_record(ckpt_dir)["arch"])


def check_dtype(ckpt_dir: str | Path, dtype: str) -> None:
    stored = read_record(ckpt_dir)["dtype"]
    if stored != dtype:
        raise SPDError(
            f"checkpoint {ckpt_dir} stores {stored} weights but model.dtype={dtype}; pass "
            f"model.dtype={stored} or re-convert with tools/convert_hf.py --dtype {dtype}"
        )


def load_stage_weights(ckpt_dir: str | Path, model: torch.nn.Module, arch: ArchSpec,
                       layer_offset: int, tp_rank: int, tp_size: int) -> None:
    """Fill a stage's GPTModel from the checkpoint, reading only this rank's slices.

    Works for both layer specs: a Transformer Engine model's fused-norm names
    (``linear_qkv.layer_norm_weight``...) are mapped to the checkpoint's local-spec names
    (``spd_megatron.convert.te_names``); ``_extra_state`` and empty placeholders are skipped.

    Raises:
        SPDError: the checkpoint lacks a tensor this stage needs, or a shape does not match.
    """
    check_tp_compatible(arch, tp_size)
    params = {k: v for k, v in model.state_dict().items() if not is_extra_state(k)}
    with safe_open(str(Path(ckpt_dir) / WEIGHTS), framework="pt") as f:
        available = set(f.keys())
        for local_name, target in params.items():
            name = checkpoint_key_for(local_to_global_key(local_name, layer_offset), available)
            if name is None and target.numel() == 0:
                continue  # TE keeps a zero-size ``bias`` when a layer has none
            if name is None:
                raise SPDError(f"checkpoint {ckpt_dir} has no tensor "
                               f"{local_to_global_key(local_name, layer_offset)} needed by this "
                               "stage; it was converted from a different model")
            shard = shard_for_tp(name, f.get_slice(name), arch, tp_rank, tp_size)
            if shard.shape != target.shape:
                raise SPDError(f"checkpoint tensor {name} gives shape {list(shard.shape)} on this rank "
                               f"but the model expects {list(target.shape)}; the checkpoint does "
                               "not match this model config")
            target.copy_(shard)


def read_full_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, with local-spec names (for the reverse conversion)."""
    with safe_open(str(Path(ckpt_dir) / WEIGHTS), framework="pt") as f:
        return normalize_to_local({k: f.get_tensor(k) for k in f.keys()})
