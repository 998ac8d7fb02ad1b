"""The builtin default model: converted on first use into a cache folder, reused afterwards."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from spd_megatron.convert.checkpoint import RECORD
from spd_megatron.convert.pipeline import convert_hf_to_checkpoint
from spd_megatron.convert.sources import BUILTIN_SOURCES, materialize_hf_folder
from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)


def cache_root(cache_dir: str = "") -> Path:
    """model.cache_dir, else $SPD_CACHE, else ~/.cache/spd_megatron."""
    root = cache_dir or os.environ.get("SPD_CACHE") or Path.home() / ".cache" / "spd_megatron"
    return Path(root).expanduser()


def builtin_hf_folder(name: str, cache_dir: str = "") -> Path:
    """The builtin model as a plain HF folder (dequantized from its GGUF once)."""
    _check_name(name)
    root = cache_root(cache_dir)
    with _lock(root, f"hf-{name}"):
        return materialize_hf_folder(name, root / "hf" / name)


def ensure_builtin_checkpoint(name: str, dtype: str, cache_dir: str = "") -> Path:
    """Path of the converted builtin model, converting it first if needed.

    Safe to call from every rank at once: a file lock lets one process convert while the others
    wait, then they all reuse the result.
    """
    _check_name(name)
    root = cache_root(cache_dir)
    out = root / "checkpoints" / f"{name}-{dtype}"
    if (out / RECORD).is_file():
        return out
    hf_folder = builtin_hf_folder(name, cache_dir)
    with _lock(root, f"ckpt-{name}-{dtype}"):
        if not (out / RECORD).is_file():
            log.warning("converting %s to %s (first use only)", name, out)
            convert_hf_to_checkpoint(hf_folder, out, dtype)
    return out


def _check_name(name: str) -> None:
    if name not in BUILTIN_SOURCES:
        raise SPDError(f"unknown builtin model '{name}'; builtin: {', '.join(BUILTIN_SOURCES)}; "
                       "or pass model.checkpoint=DIR")


class _lock:
    """An exclusive file lock under the cache root (released when the holder exits or dies)."""

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f".{name}.lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
