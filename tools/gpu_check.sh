#!/usr/bin/env bash
# The prepared GPU check of issue 6: the GPU tests, then a small benchmark, in one run.
#
#   bash tools/gpu_check.sh fetch    # on a machine with PyPI: wheels the GPU image lacks -> .whl/
#   bash tools/gpu_check.sh          # on the GPU machine: tests/gpu + tools/bench_gpu.py
#
# Results: $OUT (or runs/gpu_check/ when OUT is unset): gpu_tests.log, gpu_tests.xml,
# bench_gpu.json, bench_gpu.log, and gpu_check.json (what passed, the environment, the numbers).
#
# The GPU machine is expected to have a CUDA torch (its python3, or $PYTHON). Packages it lacks
# (megatron-core, omegaconf, gguf, this project's transformers) travel as wheels in .whl/ and are
# installed into /tmp/spd_site, ahead of the image's own packages; the project runs from this
# checkout (PYTHONPATH), so its torch is never touched. Transformer Engine is used when it imports;
# without it the TE and FP8 tests and rows are skipped (and say so). Budget: about 5-8 minutes; the
# tests and the benchmark are cut at 240 s each, so one run fits a 15-minute device lease with room
# for the machine start (give the device tool timeout_s >= 540).
# Issue 14's GPU tests are in the same run: TE mask types (no unfused attention), the FP8 recipe
# (current scaling) and FP8 vs bf16 on the builtin model (skipped when its package is not installed);
# tests/gpu/test_multi_gpu.py (NCCL protocol, dedicated draft, TP capture agreement) needs 2 GPUs and
# skips on a one-GPU lease.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WHEELS=".whl"
PY=${PYTHON:-python3}

fetch() {  # pinned to what the CPU venv runs; Python 3.12 / manylinux x86-64 as on the GPU image.
  # transformers 5.24 works with the image's huggingface_hub (>= 1.31), tokenizers and safetensors.
  mkdir -p "$WHEELS"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$WHEELS" megatron-core==0.16.1 omegaconf==2.4.0 gguf==0.19.0 transformers==5.24.0
  du -sh "$WHEELS"; ls "$WHEELS"
}

install_wheels() {
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spd_site \
      "$WHEELS"/*.whl || return 1
    export PYTHONPATH=/tmp/spd_site:$REPO${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  fi
}

run() {
  local out=${OUT:-runs/gpu_check}
  mkdir -p "$out"
  install_wheels || { echo "wheel install failed" | tee "$out/gpu_check.json"; exit 1; }
  export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
  $PY - <<'EOF' | tee "$out/env.txt"
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
import megatron.core; print("megatron-core", megatron.core.__version__)
from spd_megatron.target.specs import transformer_engine_available; print("transformer_engine usable:", transformer_engine_available())
EOF
  local t0=$SECONDS
  timeout 240 $PY -m pytest -q -rs -p no:cacheprovider -o addopts="" tests/gpu \
      --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
  local tests_rc=${PIPESTATUS[0]}
  local t1=$SECONDS
  timeout 240 $PY tools/bench_gpu.py --out "$out/bench" 2>&1 | tee "$out/bench_gpu.log"
  local bench_rc=${PIPESTATUS[0]}
  cp "$out/bench/bench_gpu.json" "$out/bench_gpu.json" 2>/dev/null
  rm -rf "$out/bench"  # the converted model: not worth bringing back
  $PY - "$out" "$tests_rc" "$bench_rc" "$((t1 - t0))" "$((SECONDS - t1))" <<'EOF'
import json, pathlib, sys
out, tests_rc, bench_rc, t_tests, t_bench = sys.argv[1:]
out = pathlib.Path(out)
log = (out / "gpu_tests.log").read_text().strip().splitlines()
bench = out / "bench_gpu.json"
summary = {"tests_rc": int(tests_rc), "tests_summary": log[-1] if log else "", "tests_seconds": int(t_tests),
           "bench_rc": int(bench_rc), "bench_seconds": int(t_bench),
           "env": (out / "env.txt").read_text().splitlines(),
           "bench": json.loads(bench.read_text()) if bench.exists() else None}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
EOF
  [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
}

case "${1:-run}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: bash tools/gpu_check.sh [fetch|run]"; exit 2 ;;
esac
