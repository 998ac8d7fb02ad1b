#!/usr/bin/env python
"""Evaluate a decoder on prompt sets, with baselines measured in the same run.

    torchrun --nproc-per-node N tools/eval.py [--config NAME|PATH] [key=value ...]
    python tools/eval.py [...]                                            # one process

Defaults (preset ``eval``): the builtin SmolLM2-135M-Instruct, MT-Bench, 512 new tokens, greedy.
Common keys: prompts_file=mt_bench|humaneval|PATH.jsonl, prompts_limit=K, max_new_tokens=N,
sampling.temperature=1, schedule.name=spd, draft.path=DIR, draft.placement=dedicated,
eval.out=DIR, eval.baselines=[ar_pp1,ar_same_pp,hf_generate,hf_prompt_lookup], eval.threads=T.

The configured run decodes on the launcher's processes; then rank 0 runs each baseline as a
subprocess (same prompts, tokens, sampling and weights). Everything lands in eval.out:
<name>.jsonl per configuration (one line per prompt; rerunning skips finished prompts),
summary.json (alpha, acceptance by draft position, tokens per cycle, E, decode and prefill
tokens/s, pooled and mean; speedups over every baseline), acceptance_by_position.png,
phase_breakdown.png, logs/ and configs/ of the baselines. All keys: spd_megatron/config.py.
"""

import sys

if __name__ == "__main__":
    from spd_megatron.eval.__main__ import main

    sys.exit(main())
