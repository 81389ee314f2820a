#!/usr/bin/env bash
# Every number on docs/results.md comes from these commands (embedded SmolLM2-135M-Instruct, CPU, 2 threads,
# bf16). Each command resumes: re-running skips samples already in docs/results/<dir>/samples_*.jsonl.
# Usage: bash benchmarks/results_page.sh [step ...]   (default: every step, in the order they were run)
set -euo pipefail
cd "$(dirname "$0")/.."
SE="${SE:-.venv/bin/selfextend}"
C=(--threads 2 --dtype bfloat16)
export SELFEXTEND_TUNED="${SELFEXTEND_TUNED:-/tmp/selfextend-results-no-tuned.json}"  # the authors' rule, not a local tune
P=docs/results/passkey
D5=0.05,0.3,0.5,0.7,0.95
D3=0.05,0.5,0.95

step_passkey() {
  $SE eval passkey "${C[@]}" --methods vanilla,self-extend,linear,ntk,dynamic-ntk,yarn,truncate --lengths 4k,8k --depths $D5 --out $P
  $SE eval passkey "${C[@]}" --methods vanilla,self-extend,dca,dca:vanilla_within_trained=false,yarn --lengths 16k --depths $D5 --out $P
  $SE eval passkey "${C[@]}" --methods linear,ntk,dynamic-ntk,truncate --lengths 16k --depths $D3 --out $P
  $SE eval passkey "${C[@]}" --methods dynamic-ntk --lengths 16k --depths $D5 --out $P  # it tied SelfExtend on 3 depths
}
step_dca_long() {
  $SE eval passkey "${C[@]}" --methods dca,self-extend --lengths 32k --depths $D5 --out $P
}
step_ppl() {
  $SE eval ppl "${C[@]}" --methods vanilla,self-extend,dca,yarn,linear,ntk,dynamic-ntk,truncate --lengths 32k --corpus pydoc --out docs/results/ppl
}
step_passkey_long() {
  $SE eval passkey "${C[@]}" --methods self-extend,dca:vanilla_within_trained=false --lengths 24k --depths $D3 --out $P
  $SE eval passkey "${C[@]}" --methods vanilla,self-extend,linear,ntk,dynamic-ntk,yarn,truncate,dca --lengths 24k,32k --depths $D3 --out $P
}
step_temperature() {  # the attention temperature (YaRN's 0.1 ln s + 1, per query past L) on the two remappings
  $SE eval passkey "${C[@]}" --methods self-extend:temperature=true,dca:temperature=true --lengths 32k --depths $D3 --out $P
  $SE eval passkey "${C[@]}" --methods self-extend:temperature=true,dca:temperature=true --lengths 16k --depths $D5 --out $P
}
RULER_TASKS="niah_single niah_multikey niah_multikey_uuid niah_multivalue niah_multiquery vt cwe fwe kv_retrieval niah"
step_ruler() {  # at 8k every method resolves to vanilla (G=1, factor 1, DCA vanilla within L): vanilla only
  for task in $RULER_TASKS; do
    $SE eval $task "${C[@]}" --methods vanilla --lengths 8k --depths 0.5 --out docs/results/ruler
    $SE eval $task "${C[@]}" --methods vanilla,self-extend,dynamic-ntk --lengths 16k --depths 0.5 --out docs/results/ruler
  done
}
step_ruler_more() {
  for task in $RULER_TASKS; do
    $SE eval $task "${C[@]}" --methods yarn,dca --lengths 16k --depths 0.5 --out docs/results/ruler
  done
}
step_tune() {  # TUNE_LENGTHS / TUNE_MINUTES pick the lengths and the budget of each run (it resumes)
  for n in ${TUNE_LENGTHS:-16384 32768}; do
    SELFEXTEND_TUNED=docs/results/tune_$n/tuned.json $SE tune "${C[@]}" --target-length $n --budget-minutes "${TUNE_MINUTES:-40}" --out docs/results/tune_$n
  done
}

T=docs/results/passkey_n10  # issue 18: 10 samples per cell (5 depths x seeds 0, 1)
step_trust_passkey() {  # cheapest first: in-window reference, SelfExtend at 16k/24k, then the others, then 32k
  $SE eval passkey "${C[@]}" --methods vanilla --lengths 8k --depths $D5 --samples 2 --out $T
  $SE eval passkey "${C[@]}" --methods self-extend --lengths 16k,24k --depths $D5 --samples 2 --out $T
  $SE eval passkey "${C[@]}" --methods truncate,dynamic-ntk,dca,yarn,vanilla --lengths 16k --depths $D5 --samples 2 --out $T
  $SE eval passkey "${C[@]}" --methods truncate,dynamic-ntk,dca,yarn,vanilla --lengths 24k --depths $D5 --samples 2 --out $T
  # 32k: beside the rule's and grouped_scale's ten 32k samples in $P (the same prompts), so paired
  $SE eval passkey "${C[@]}" --methods truncate,dynamic-ntk,dca,yarn,vanilla --lengths 32k --depths $D5 --samples 2 --out $P
}
step_trust_prose_32k() {  # real prose and the other wording at 4x L: seed 0 first, then seed 1 (the runs resume)
  for n in 1 2; do
    $SE eval passkey_essays "${C[@]}" --methods self-extend,self-extend:grouped_scale=1.3 --lengths 32k --depths $D5 \
      --samples $n --out $T
    $SE eval passkey_alt "${C[@]}" --methods self-extend --lengths 32k --depths $D5 --samples $n --out $T
  done
}
step_trust_ruler() {  # issue 18: RULER at 16k with 5 samples per cell (5 depths; vt has no depth: 5 seeds),
  # beside the in-window reference at 8k
  R=docs/results/ruler_n5
  for task in niah_single niah_multikey vt; do
    if [ $task = vt ]; then n=(--samples 5); else n=(--depths $D5); fi
    $SE eval $task "${C[@]}" --methods vanilla --lengths 8k "${n[@]}" --out $R
    $SE eval $task "${C[@]}" --methods self-extend,dca,dynamic-ntk,vanilla --lengths 16k "${n[@]}" --out $R
  done
}
step_trust_prose() {  # the same grid on real prose and in other words: in-window reference, then SelfExtend
  for task in passkey_essays passkey_alt; do
    $SE eval $task "${C[@]}" --methods vanilla --lengths 8k --depths $D5 --samples 2 --out $T
    $SE eval $task "${C[@]}" --methods self-extend --lengths 16k,24k --depths $D5 --samples 2 --out $T
  done
}
step_trust_prose_more() {  # prose: 20 samples per cell (seeds 0-3), and a wider window at 16k (effective
  # positions up to 7168 of 8192 instead of 4864), the setting the 16k shortfall suggested; dynamic NTK beside
  $SE eval passkey_essays "${C[@]}" --methods vanilla --lengths 8k --depths $D5 --samples 4 --out $T
  $SE eval passkey_essays "${C[@]}" --methods self-extend,self-extend:group_size=4:window=4096 --lengths 16k \
    --depths $D5 --samples 4 --out $T
  $SE eval passkey_essays "${C[@]}" --methods dynamic-ntk --lengths 16k --depths $D5 --samples 2 --out $T
}
step_truncate_middle() {  # truncate's default became middle truncation (LongBench): the old rows, which kept
  # the last 8128 tokens, are labelled truncate:drop=start in docs/results/passkey; the same grid re-run
  $SE eval passkey "${C[@]}" --methods truncate --lengths 4k,8k --depths $D5 --out $P
  $SE eval passkey "${C[@]}" --methods truncate --lengths 16k,24k,32k --depths $D3 --out $P
}
step_32k_variants() {  # what the 32k attention diagnostic points to, on the rule's 32k samples (paired):
  # a smaller G (the smallest whose reach covers 32k at W=2048) and a sharper grouped softmax
  $SE eval passkey "${C[@]}" --methods self-extend:group_size=6:window=2048 --lengths 32k --depths $D5 --out $P
  $SE eval passkey "${C[@]}" --methods self-extend:grouped_scale=1.3 --lengths 32k --depths $D5 --out $P
  $SE eval passkey "${C[@]}" --methods self-extend:grouped_scale=1.3,self-extend --lengths 32k --depths $D5 \
    --samples 2 --out $P  # a second seed for both
}
step_grouped_scale() {  # the sharper grouped softmax at 16k (filler, prose) and on perplexity
  $SE eval passkey "${C[@]}" --methods self-extend:grouped_scale=1.3 --lengths 16k --depths $D5 --out $P
  $SE eval passkey_essays "${C[@]}" --methods self-extend:grouped_scale=1.3 --lengths 16k --depths $D5 \
    --samples 2 --out $T
  $SE eval ppl "${C[@]}" --methods self-extend:grouped_scale=1.3 --lengths 32k --corpus pydoc --out docs/results/ppl
}
step_scale_base() {  # the log scaling of the authors' code (base L) on the rule's 32k samples (paired), and its
  # perplexity cost
  $SE eval passkey "${C[@]}" --methods self-extend:scale_base=8192 --lengths 32k --depths $D5 --out $P
  $SE eval ppl "${C[@]}" --methods self-extend:scale_base=8192 --lengths 32k --corpus pydoc --out docs/results/ppl
}
step_grouped_scale_values() {  # milder grouped_scale values: perplexity first (cheap), then retrieval at 32k
  $SE eval ppl "${C[@]}" --methods self-extend:grouped_scale=1.1,self-extend:grouped_scale=1.15 --lengths 32k \
    --corpus pydoc --out docs/results/ppl
  $SE eval passkey "${C[@]}" --methods self-extend:grouped_scale=1.15,self-extend:grouped_scale=1.1 --lengths 32k \
    --depths $D5 --out $P
  for corpus in stdlib essays; do
    $SE eval ppl "${C[@]}" --methods self-extend:grouped_scale=1.15,self-extend:grouped_scale=1.1 --lengths 32k \
      --corpus $corpus --out docs/results/ppl_$corpus
  done
}
step_trust_ppl() {  # SelfExtend's perplexity past L on three corpora against reading with the trained window
  # (truncate is scored sliding: windows of its keep = L - 64 tokens every keep/2, every token scored once)
  # (pydoc: the rows of step_ppl in docs/results/ppl, grouped_scale there by step_grouped_scale)
  for corpus in stdlib essays; do
    $SE eval ppl "${C[@]}" --methods self-extend,truncate,self-extend:grouped_scale=1.3 --lengths 32k \
      --corpus $corpus --out docs/results/ppl_$corpus
  done
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(passkey ppl dca_long ruler passkey_long tune temperature ruler_more)
for s in "${steps[@]}"; do "step_$s"; done
$SE page docs/results.md  # the page's table blocks, re-rendered from the samples the steps added
