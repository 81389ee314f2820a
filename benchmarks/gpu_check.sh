#!/usr/bin/env bash
# The one prepared GPU check (issues 19, 26 and 27): correctness first (every backend against the fp64
# oracle, layers split between cuda:0 and the CPU, the vLLM plugin's paged kernel), then timings (attention at
# 32k-128k, a 4-layer Llama-3-8B-shaped model at 32k, the vLLM plugin's GPU path), then a summary of issue
# 26's and issue 27's "Must reach" ratios (benchmarks/gpu_summary.py). Everything lands in OUT as JSONL
# (every row flushed as it is written) plus gpu_check.log and summary.json.
#
#   bash benchmarks/gpu_check.sh OUT             # on the GPU machine (H100/H200): within 6 minutes
#   bash benchmarks/gpu_check.sh OUT --dry-run   # CPU shapes, about a minute (tests/test_gpu_check.py)
#   python benchmarks/gpu_summary.py OUT         # the summary again, from the rows
#
# Time on the GPU (6 minutes = 360 s). Each part gets a soft budget (--budget-s, counted from its process's
# start: interpreter, imports, CUDA context included), checked before every step; what it did not reach is
# written as {"status": "skipped", "skipped": "out of time"} rows and the part exits 0. Each part also has
# a hard `timeout`, 10-15 s above its budget: room for the one step in flight (a Triton compile, a model
# round, one attention cell; a Flex cell starts only with 20 s of budget left).
#
#   part                 budget  limit   what fits (estimated from the H200 rates of 2026-12-04)
#   header                    -     15   nvidia-smi, torch import (~5 s)
#   kernels                  55     70   composed/triton/reference x 96 cases, bf16 and fp16 first, fp32 last;
#                                        the fp64 oracle on the GPU takes ms a case (seconds on the CPU), so
#                                        the Triton compiles (~1-3 s each) set the pace
#   paged (correctness)      30     40   12 cases, 6 kernel builds
#   split                    20     30   4-layer d=64 fp32 model on cuda:0 + CPU (Triton, no Flex compile)
#   attention                82     97   all in one process, inputs drawn on the GPU: sdpa/composed/triton on
#                                        32k prefill, 1 and 16 x 32k decode, 64k and 128k prefill, then 64k
#                                        and 128k decode (5 calls a prefill cell: at 128k SDPA ~0.21 s, Triton
#                                        ~0.5 s a call; decode cells 20 calls of < 10 ms): ~30 s with imports;
#                                        then flex on the same cells (~10-20 s a compile) in the rest
#   model                    50     65   model built on the GPU in bf16 (~2 s; init on the CPU and copy: ~45 s
#                                        of the 72 s part on 2026-12-04); 2 rounds of vanilla + SelfExtend, 32k
#                                        prefill + 64 decode steps: round 0 ~20 s with compiles and cuDNN
#                                        plans, round 1 ~3 s
#   paged (timing)           28     38   issue 27: decode 16 x 32k, prefill 32k, a 2k chunk after 30k, decode
#                                        1 x 128k: SDPA on contiguous K/V, the plugin's GPU path (paged kernel
#                                        for decode, gather + composed otherwise), the paged kernel alone; one
#                                        layer's gathered K, V, grouped K at 32k and 128k. Each cell < 0.5 s of
#                                        calls; the paged kernel's compiles (~2 s a variant, 2-4 variants), the
#                                        composed ops' probes, merge compile and cuDNN plans: ~12 s + imports
#   summary                   -      5   reads the rows (< 1 s)
#   sum of budgets          265          every budget used up: ~285 s with header, summary, steps in flight
#                                        (attention gave 8 s of its flex time to the paged timing part)
#   sum of limits                  360   the worst case, every part killed at its limit: 6 minutes
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [--dry-run]}
dry=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python}
log="$out/gpu_check.log"
status=0

part() {  # part NAME SECONDS COMMAND...: run one part with a time limit, log it, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "-- $name: exit $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

{ date -u; timeout 15 $py -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; nvidia-smi 2>/dev/null | head -15; } >>"$log" 2>&1

if [ "$dry" = "--dry-run" ]; then  # the same scripts and options on CPU shapes; generous limits (2 cores)
  part kernels 300 $py benchmarks/gpu_kernels.py --dry-run --budget-s 120 --out "$out/kernels.jsonl"
  part paged 300 $py benchmarks/gpu_paged.py --dry-run --parts correctness --budget-s 120 \
    --out "$out/paged.jsonl"
  part split 300 $py benchmarks/gpu_model.py split --dry-run --budget-s 120 --out "$out/split.jsonl"
  part attention 300 $py benchmarks/bench_attention.py --device cpu --in-process --shapes embedded \
    --cells prefill:1024,decode:1024:1,decode:1024:4 --window 128 --group 4 \
    --methods sdpa,composed,triton,flex --late-methods flex --budget-s 120 --out "$out/attention.jsonl"
  part model 300 $py benchmarks/gpu_model.py bench --dry-run --budget-s 120 --out "$out/model.jsonl"
  part paged-timing 300 $py benchmarks/gpu_paged.py --dry-run --parts timing --budget-s 60 \
    --out "$out/paged_timing.jsonl"
  part summary 60 $py benchmarks/gpu_summary.py "$out" --shape embedded --prefill-lengths 1024 \
    --decode-length 1024 --decode-batches 1,4 --model-length 200 --json "$out/summary.json"
else
  part kernels 70 $py benchmarks/gpu_kernels.py --budget-s 55 --out "$out/kernels.jsonl"
  part paged 40 $py benchmarks/gpu_paged.py --parts correctness --budget-s 30 --out "$out/paged.jsonl"
  part split 30 $py benchmarks/gpu_model.py split --budget-s 20 --out "$out/split.jsonl"
  cells=prefill:32768,decode:32768:1,decode:32768:16,prefill:65536,prefill:131072  # issue 26's targets first
  cells=$cells,decode:65536:1,decode:65536:16,decode:131072:1,decode:131072:16
  part attention 97 $py benchmarks/bench_attention.py --device cuda --in-process --shapes llama3-8b \
    --cells "$cells" --methods sdpa,composed,triton,flex --late-methods flex --budget-s 82 \
    --out "$out/attention.jsonl"
  part model 65 $py benchmarks/gpu_model.py bench --length 32768 --layers 4 --new-tokens 64 --rounds 2 \
    --budget-s 50 --out "$out/model.jsonl"
  part paged-timing 38 $py benchmarks/gpu_paged.py --parts timing --budget-s 28 \
    --out "$out/paged_timing.jsonl"
  part summary 5 $py benchmarks/gpu_summary.py "$out" --json "$out/summary.json"
fi
sed -n '/^== summary of/,$p' "$log" | grep -v '^-- summary' || true
[ "$dry" = "--dry-run" ] && echo "(dry run: CPU shapes and CPU timings; its verdicts check the plumbing, not the GPU)"
echo "gpu_check: $( [ $status -eq 0 ] && echo 'all parts passed' || echo 'some parts FAILED' ) ($log)" | tee -a "$log"
exit $status
