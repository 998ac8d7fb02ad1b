#!/usr/bin/env python
"""Train a Pipeline Draft Module (PDM) against a frozen target checkpoint.

    python tools/train_draft.py [--config NAME|PATH] [key=value ...]

Keys (spd_megatron/config.py, section ``train``): train.data=sharegpt|FILE, train.num_stages=2,
train.pdm_layers=1, train.draft_vocab_size=8192, train.steps=1000, train.max_len=512,
train.time_budget_min=0, train.out=runs/pdm; model.checkpoint=DIR (default: the builtin model);
parallel.layers_per_stage=[...] (the stage split the draft will run with); draft.anchors=[...].
Resumes from train.out/latest; the deployable PDM is train.out/final (decode.py draft.path=...).
Data parallel: torchrun --nproc-per-node N tools/train_draft.py train.batch_tokens=T ... (T tokens per
global micro-batch, a multiple of N and at least N x train.max_len; gloo on CPU, NCCL on GPUs).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    import argparse

    from spd_megatron.config import load_config
    from spd_megatron.errors import SPDError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    from spd_megatron.console import configure_output, level_from_argv

    configure_output(level_from_argv(args.overrides, verbose=False))
    try:
        from spd_megatron.draft.training.run import TimeBudgetReached, train_draft
        from spd_megatron.parallel.init import shutdown_parallel

        try:
            final = train_draft(load_config(args.config, args.overrides))
        finally:
            shutdown_parallel()
    except TimeBudgetReached as stop:
        print(stop)
        return 0
    except SPDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {final} (use: examples/decode.py schedule.name=spd draft.path={final})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
