#!/usr/bin/env bash
# Every number on docs/results.md comes from these commands (embedded SmolLM2-135M-Instruct, CPU, 2 threads).
# Each command resumes: re-running skips samples already in docs/results/<dir>/samples_*.jsonl.
# Usage: bash benchmarks/results_page.sh [step ...]   (default: all steps in order)
set -euo pipefail
cd "$(dirname "$0")/.."
SE="${SE:-.venv/bin/selfextend}"
COMMON=(--threads 2 --dtype bfloat16)
ALL="vanilla,self-extend,linear,ntk,dynamic-ntk,yarn,truncate${EXTRA_METHODS:-}"
DEPTHS5=0.05,0.3,0.5,0.7,0.95
DEPTHS3=0.05,0.5,0.95

step_passkey() { $SE eval passkey "${COMMON[@]}" --methods "$ALL" --lengths 4k,8k,16k --depths $DEPTHS5 --out docs/results/passkey; }
step_ppl() { $SE eval ppl "${COMMON[@]}" --methods "$ALL" --lengths 32k --corpus pydoc --out docs/results/ppl; }
step_passkey_long() { $SE eval passkey "${COMMON[@]}" --methods "$ALL" --lengths 24k,32k --depths $DEPTHS3 --out docs/results/passkey; }
step_ruler() {
  for task in niah_single niah_multikey niah_multivalue niah_multiquery vt cwe fwe kv_retrieval; do
    $SE eval $task "${COMMON[@]}" --methods "vanilla,self-extend,${BEST_ROPE:-yarn}${EXTRA_METHODS:-}" --lengths 8k,16k --depths 3 --out docs/results/ruler
  done
}
step_tune() {
  for n in 16384 32768; do $SE tune "${COMMON[@]}" --target-length $n --budget-minutes "${TUNE_MINUTES:-40}" --out docs/results/tune_$n; done
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(passkey ppl passkey_long ruler tune)
for s in "${steps[@]}"; do "step_$s"; done
