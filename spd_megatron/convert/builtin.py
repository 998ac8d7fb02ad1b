"""The builtin default model: converted on first use into a cache folder, reused afterwards.

Every rank (or separate process) may call ``ensure_builtin_checkpoint`` at once: a file lock lets
one of them convert, whichever it is, while the others say that they wait; the result is checked
before it is renamed into place, and an incomplete folder (an older version's, or one a crash left)
is rebuilt. The converting process prints one line before the slow GGUF dequantisation and shows a
spinner through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from spd_megatron.convert.checkpoint import check_checkpoint
from spd_megatron.convert.pipeline import convert_hf_to_checkpoint
from spd_megatron.convert.sources import BUILTIN_SOURCES, check_hf_folder, materialize_hf_folder
from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)

LOCK_WAIT_S = 1800.0  # as parallel.setup_timeout_s


def cache_root(cache_dir: str = "") -> Path:
    """model.cache_dir, else $SPD_CACHE, else ~/.cache/spd_megatron."""
    root = cache_dir or os.environ.get("SPD_CACHE") or Path.home() / ".cache" / "spd_megatron"
    return Path(root).expanduser()


def builtin_hf_folder(name: str, cache_dir: str = "", wait_s: float = LOCK_WAIT_S,
                      progress: bool = True) -> Path:
    """The builtin model as a plain HF folder (dequantized from its GGUF once)."""
    _check_name(name)
    root = cache_root(cache_dir)
    out = root / "hf" / name
    if _problem(check_hf_folder, out) is None:
        return out
    with _lock(root, f"hf-{name}", f"{name} (HF folder)", wait_s):
        if _problem(check_hf_folder, out) is None:
            return out
        _remove_stale_temporaries(out)
        shown = _first_use_progress(name, out, "dequantising the GGUF") if progress \
            else contextlib.nullcontext()
        with shown:
            return materialize_hf_folder(name, out, rebuild=True)


def ensure_builtin_checkpoint(name: str, dtype: str, cache_dir: str = "",
                              wait_s: float = LOCK_WAIT_S) -> Path:
    """Path of the converted builtin model, converting it first if needed (see the module doc)."""
    _check_name(name)
    root = cache_root(cache_dir)
    out = root / "checkpoints" / f"{name}-{dtype}"
    if _problem(check_checkpoint, out) is None:
        return out
    with _lock(root, f"ckpt-{name}-{dtype}", f"{name} ({dtype})", wait_s):
        problem = _problem(check_checkpoint, out)
        if problem is None:
            return out
        if out.exists():
            log.warning("rebuilding %s: %s", out, problem)
        _remove_stale_temporaries(out)
        with _first_use_progress(name, out, "dequantising the GGUF") as step:
            hf_folder = builtin_hf_folder(name, cache_dir, wait_s, progress=False)
            step("converting to Megatron-core names and writing the checkpoint")
            convert_hf_to_checkpoint(hf_folder, out, dtype, show_progress=False)
    return out


def _problem(check: Callable[[Path], None], folder: Path) -> str | None:
    """Why ``folder`` cannot be used (``check`` raised), or None when it can."""
    if not folder.exists():
        return "missing"
    try:
        check(folder)
    except SPDError as err:
        return str(err)
    return None


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders next to ``out`` that a killed writer left (the caller holds the lock)."""
    for tmp in out.parent.glob(f".{out.name}.*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_name(name: str) -> None:
    if name not in BUILTIN_SOURCES:
        raise SPDError(f"unknown builtin model '{name}'; builtin: {', '.join(BUILTIN_SOURCES)}; "
                       "or pass model.checkpoint=DIR")


@contextlib.contextmanager
def _first_use_progress(name: str, out: Path, first_step: str) -> Iterator[Callable[[str], None]]:
    """One line before the slow part, then a spinner (step, elapsed time) until it is done."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    console.print(f"first use: converting {name} into {out} (about a minute; later runs reuse it)",
                  highlight=False, soft_wrap=True)
    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with _hf_progress_bars_off(), Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(first_step, total=None)
        yield lambda text: progress.update(task, description=text)
    console.print(f"first use: {name} ready in {time.monotonic() - start:.0f} s", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _hf_progress_bars_off() -> Iterator[None]:
    """transformers' own progress bars (its GGUF loop's tqdm too) off while our spinner runs."""
    from functools import partial

    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


class _lock:
    """An exclusive file lock under the cache root (released when the holder exits or dies).

    A process that finds it held says so once, then waits up to ``wait_s`` seconds.
    """

    def __init__(self, root: Path, name: str, what: str, wait_s: float = LOCK_WAIT_S) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path, self.what, self.wait_s = root / f".{name}.lock", what, wait_s

    def __enter__(self):
        self.file = open(self.path, "w")
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.file.close()
                    raise SPDError(f"waited {self.wait_s:.0f} s for another process converting "
                                   f"{self.what} (it holds {self.path}); stop it, or raise "
                                   "parallel.setup_timeout_s") from None
                if not said:
                    print(f"waiting for another process to convert {self.what} (first use only)",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
