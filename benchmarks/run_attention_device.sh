#!/bin/bash
# One device call: the attention candidates at the 1.5B shapes, each step in its own process
# with a time limit and a stack dump before it, so a slow or stuck candidate costs only its step.
T0=$(date +%s)
step() {
  local limit=$1; shift
  echo "### t=$(( $(date +%s) - T0 )) s: $*"
  timeout "$limit" python benchmarks/attention.py --budget $(( limit - 20 )) "$@" 2>&1 | grep -v "^\s*$" | head -40
}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
step 60 --shapes 8x2048 --candidates pallas_flash --masks window,global,packed
step 60 --shapes 8x2048 --candidates cudnn_skip_pad --masks window,global,packed
step 50 --shapes 8x2048 --candidates cudnn_skip --masks window
step 60 --shapes 4x4096 --candidates pallas_flash,cudnn_skip_pad,cudnn --masks window,packed
echo "### t=$(( $(date +%s) - T0 )) s: done"
