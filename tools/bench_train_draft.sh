#!/bin/bash
# Draft-training throughput, variants back to back (issue 12): 1 process x 2 threads vs DP=2 x 1 thread,
# one conversation per step vs two token-sized batches. Each line is the trainer's own logged tok/s.
# Run from the repository root: tools/bench_train_draft.sh  (output in runs/bench_train/)
[ -f .venv/bin/activate ] && . .venv/bin/activate
COMMON="train.data=sharegpt train.limit=200 train.max_len=384 train.held_out=4 train.num_stages=2 train.resume=false train.save_every=100000"
run() {  # name, launcher, extra keys
  local name=$1; shift; local launch=$1; shift
  rm -rf runs/bench_train/$name
  local t0=$(date +%s)
  $launch tools/train_draft.py $COMMON train.out=runs/bench_train/$name "$@" > runs/bench_train/$name.log 2>&1
  python - "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
rec = json.load(open(f"runs/bench_train/{sys.argv[1]}/final/training.json"))
h = [x for x in rec["history"] if "train_tok_s" in x][-1]
print(f"{sys.argv[1]:28s} steps {h['step']:3d} tokens {h['tokens_seen']:6d} train tok/s {h['train_tok_s']:7.1f} wall {sys.argv[2]} s", flush=True)
PY
}
mkdir -p runs/bench_train
ONE="env OMP_NUM_THREADS=2 python"
DP2="env OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --master-port 29617"
run p1t2_conv1 "$ONE" train.batch_tokens=0 train.steps=30 train.eval_every=30
run p1t2_b1536 "$ONE" train.batch_tokens=1536 train.steps=8 train.eval_every=8
run dp2t1_b1536 "$DP2" train.batch_tokens=1536 train.steps=8 train.eval_every=8
run p1t2_b6144 "$ONE" train.batch_tokens=6144 train.steps=3 train.eval_every=3
run dp2t1_b6144 "$DP2" train.batch_tokens=6144 train.steps=3 train.eval_every=3
