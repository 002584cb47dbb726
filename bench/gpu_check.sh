#!/usr/bin/env bash
# One command for the GPU day (issue 19): on one H100/H200, in under 8 minutes, it runs
#   1. the GPU tests: bf16 grouped GEMM vs the per-expert loop, fp32 on CUDA, no host sync in a bf16 step,
#      two adapters chosen per sample against each alone;
#   2. bench/train_step.py, moetune and transformers + PEFT at the reference shape of docs/benchmarks.md
#      (attention-only LoRA, attention + experts, the same with activation checkpointing);
#   3. bench/moe_block.py, the one-MoE-block benchmark, eager and compiled, with and without LoRA;
#   4. bench/multi_adapter.py, four adapters trained together vs one after another, bf16;
# and prints one table (results also kept as JSON lines in a fresh temporary folder, printed at the end).
#
#   bash bench/gpu_check.sh             # the GPU
#   bash bench/gpu_check.sh --dry-run   # every step at toy size on the CPU (a test runs this)
#
# Each step has its own time limit, so a hung step costs its limit and shows in the table as rc 124.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

out=$(mktemp -d "${TMPDIR:-/tmp}/moetune-gpu-check.XXXXXX")
results="$out/results.jsonl"
: > "$results"

step() {  # step NAME SECONDS COMMAND...: run, keep its JSON lines, add a row for the step itself
  local name=$1 limit=$2 start rc summary
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.err"
  rc=$?
  grep '^{' "$out/$name.out" | sed "s/^{/{\"step\": \"$name\", /" >> "$results"
  summary=$(grep -E '(passed|failed|error)' "$out/$name.out" | tail -n 1 | tr -d '"=')
  printf '{"step": "%s", "rc": %d, "seconds": %d, "summary": "%s"}\n' \
    "$name" "$rc" "$(( $(date +%s) - start ))" "$summary" >> "$results"
}

if [ "$dry" = 1 ]; then
  step gpu-tests 120 python -m pytest -q -rs -p no:cacheprovider \
    tests/model/test_grouped_devices.py -k "bf16 or support"
  step train-step 300 python bench/train_step.py --device cpu --tiny --steps 1 --warmup 0
  step moe-block 300 python bench/moe_block.py --device cpu --tiny --compile-backend eager
  step multi-adapter 120 python bench/multi_adapter.py --tiny --steps 1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # limits add up to 7.8 minutes; the device-independent sync tests run on every CPU CI already
  step gpu-tests 90 python -m pytest -q -rs -p no:cacheprovider tests/model/test_grouped_devices.py
  step train-step 150 python bench/train_step.py --steps 5 --warmup 2
  step moe-block 190 python bench/moe_block.py
  step multi-adapter 40 python bench/multi_adapter.py --device cuda --dtype bfloat16 --hidden 2048 \
    --experts 64 --top-k 8 --tokens 1024 --steps 5
fi

python bench/table.py "$results"
echo "results: $results (each step's output and errors beside it)"
! grep -q '"rc": [1-9]' "$results"
