"""Hugging Face ``generate`` on the same weights, timed like our DecodeStats (a baseline).

Plain ``generate`` and prompt-lookup decoding (``prompt_lookup_num_tokens``, HF's draft-free
speculative decoding). A streamer timestamps the first new tokens and the end; a forward
pre-hook counts the target's forward passes and the candidate tokens each one checks, so prompt
lookup reports acceptance and tokens per forward like our speculative schedules do.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch


class TimingStreamer:
    """A transformers streamer: when the first new tokens arrived (and how many), and the end."""

    def __init__(self) -> None:
        self.puts, self.t_first, self.t_end, self.first_count = 0, 0.0, 0.0, 0
        self.step_tokens: list[int] = []  # new tokens per put (per target forward after the prompt)

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 1:  # the prompt
            return
        count = int(value.numel())
        self.step_tokens.append(count)
        if self.puts == 2:  # the first new token(s): prefill ends here
            self.t_first, self.first_count = time.perf_counter(), count

    def end(self) -> None:
        self.t_end = time.perf_counter()


class ForwardCounter:
    """Counts the model's forward passes and the tokens each one is fed (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[1]) if ids is not None else 1)  # ids [1, q_len]

    def remove(self) -> None:
        self.handle.remove()


def load_hf(hf_dir: str, dtype: str = "float32", device: Optional[str] = None):
    """The HF model (eval mode) from a local folder, on ``device`` (default: CUDA if present)."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype), local_files_only=True)
    return model.to(device).eval()


def generation_config(model, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, eos_token_ids: Sequence[int] = (), prompt_lookup: int = 0,
                      max_ngram: int = 2):
    """An explicit GenerationConfig (the folder's defaults, e.g. a top_k of 50, never leak in)."""
    from transformers import GenerationConfig

    eos = list(eos_token_ids) or model.generation_config.eos_token_id
    sampled = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) \
        if temperature > 0 else dict(do_sample=False)
    lookup = dict(prompt_lookup_num_tokens=prompt_lookup, max_matching_ngram_size=max_ngram) \
        if prompt_lookup else {}
    first_eos = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=first_eos,
                            use_cache=True, **sampled, **lookup)


def hf_generate(model, ids: list[int], max_new_tokens: int, gen_config=None, seed: int = 0) -> dict:
    """``generate`` of one prompt; per-prompt stats with our DecodeStats keys, plus output_ids.

    Prefill = until the first new tokens (with prompt lookup the first forward may already
    commit several); decode tokens/s counts the tokens after those.
    """
    gen_config = gen_config or generation_config(model, max_new_tokens)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)  # [1, prompt_len]
    streamer, counter = TimingStreamer(), ForwardCounter(model)
    torch.manual_seed(seed)  # sampling: the same seed gives the same output
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=gen_config, streamer=streamer)
    finally:
        counter.remove()
    new_ids = out[0, len(ids):].tolist()
    return dict(_timing(streamer, t0, len(ids), len(new_ids)), **_forward_stats(counter, streamer, len(ids)),
                stop_reason=_stop_reason(new_ids, gen_config), output_ids=new_ids)


def _timing(streamer: TimingStreamer, t0: float, prompt_tokens: int, new_tokens: int) -> dict:
    decode_tokens = max(new_tokens - streamer.first_count, 0)
    decode_s = streamer.t_end - streamer.t_first if streamer.t_first else 0.0
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_tokens": decode_tokens,
            "prefill_seconds": (streamer.t_first or streamer.t_end) - t0, "decode_seconds": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0}


def _forward_stats(counter: ForwardCounter, streamer: TimingStreamer, prompt_len: int) -> dict:
    """Decode forwards (cycles) and, for prompt lookup, candidates checked and accepted.

    Each forward checks its candidates (input length - 1; the first forward's input is the prompt
    plus candidates) and commits the accepted ones plus one target token.
    """
    fed = counter.lengths[:len(streamer.step_tokens)]
    proposed = sum(max(q - 1, 0) for q in fed[1:]) + (max(fed[0] - prompt_len, 0) if fed else 0)
    accepted = sum(max(c - 1, 0) for c in streamer.step_tokens)
    cycles = max(len(streamer.step_tokens) - 1, 0)  # forwards after the one that ended the prefill
    return {"cycles": cycles, "pipeline_depth": 1, "verified": proposed, "accepted": min(accepted, proposed)}


def _stop_reason(new_ids: list[int], gen_config) -> str:
    eos = gen_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return "eos" if new_ids and new_ids[-1] in eos else "length"
