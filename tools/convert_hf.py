#!/usr/bin/env python
"""Convert a Hugging Face model to an spd_megatron (Megatron-core) checkpoint, or back.

    python tools/convert_hf.py --hf SRC --out DIR [--dtype float32|bfloat16] [--verify]
    python tools/convert_hf.py --to-hf CKPT --out DIR

SRC: an HF model folder (config.json + safetensors), a .gguf file, or a builtin name
(smollm2-135m-instruct). The checkpoint loads under any tensor x pipeline layout.
"""

from __future__ import annotations

import argparse
import sys

from spd_megatron.errors import SPDError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF folder, .gguf file or builtin name to convert")
    src.add_argument("--to-hf", metavar="CKPT", help="spd_megatron checkpoint to convert back to HF")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--verify", action="store_true",
                   help="run both models on a prompt and report the max logit difference")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (--to-hf)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from spd_megatron.console import configure_output

    configure_output("warning")
    args = parse_args(argv)
    try:
        from spd_megatron.convert.pipeline import convert_checkpoint_to_hf, convert_hf_to_checkpoint

        if args.to_hf:
            out = convert_checkpoint_to_hf(args.to_hf, args.out, overwrite=args.overwrite)
            print(f"wrote HF model folder {out}")
            return 0
        out = convert_hf_to_checkpoint(args.hf, args.out, args.dtype)
        print(f"wrote checkpoint {out}")
        if args.verify:
            from spd_megatron.convert.verify import verify_against_hf

            diff = verify_against_hf(out, args.hf)
            print(f"verify: max |logits(megatron) - logits(HF)| = {diff:.3e} ({args.dtype})")
    except SPDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
