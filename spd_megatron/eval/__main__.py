"""Entry of tools/eval.py and of its baseline subprocesses.

    torchrun --nproc-per-node N -m spd_megatron.eval [--config NAME|PATH] [key=value ...]
    python -m spd_megatron.eval [...]                      # one process
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    """The decode CLI (config, overrides, one-line errors on every rank) running the eval job."""
    from spd_megatron.eval.orchestrate import run_eval
    from spd_megatron.runner import main as run_main

    return run_main(argv, config="eval", job=run_eval, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
