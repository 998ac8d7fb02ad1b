#!/usr/bin/env python
"""Decode prompts with a pipeline-parallel target on Megatron-core.

    torchrun --nproc-per-node N examples/decode.py [--config NAME|PATH] [key=value ...]

With no arguments: the builtin SmolLM2-135M-Instruct (converted on first use into
~/.cache/spd_megatron), a builtin chat prompt, one pipeline stage per process. Common keys:
prompt="...", prompts_file=PATH|mt_bench|humaneval, prompts_limit=K, max_new_tokens=64,
schedule.name=autoregressive, sampling.temperature=0.7, sampling.seed=1,
parallel.tensor_parallel_size=2, parallel.pipeline_parallel_size=2, model.checkpoint=DIR,
model.dtype=bfloat16, report.json=out.json. All keys: spd_megatron/config.py.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if __name__ == "__main__":
    from spd_megatron.runner import main

    sys.exit(main())
