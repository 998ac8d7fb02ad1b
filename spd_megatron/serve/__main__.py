"""OpenAI-compatible HTTP server over the pipeline ranks.

    torchrun --nproc-per-node N -m spd_megatron.serve [--config NAME|PATH] [key=value ...]
    mpirun -np N python -m spd_megatron.serve ...      python -m spd_megatron.serve ...   (1 process)

Same config tree as examples/decode.py plus ``serve.*`` (host, port, max_queue, api_key,
request_timeout_s, model_name). Every rank loads its part once; rank 0 serves HTTP, the others
decode what it sends them (spd_megatron/serve/wire.py). Exit 0 after SIGTERM/SIGINT, 2 on bad
input or when a rank failed (one ``error:`` line names the cause), 1 on a bug.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402

if __name__ == "__main__":
    from spd_megatron.serve.server import main

    code = main()
    if code:  # a failed rank may leave a thread blocked on a dead peer: do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)
