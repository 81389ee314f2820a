#!/usr/bin/env bash
# The one prepared GPU check (issue 19): kernels against the fp64 oracle, the vLLM plugin's paged kernel
# (oracle, then decode/prefill timings at 32k), attention timings at 32k-128k, a Llama-3-8B-shaped model end
# to end, and layers split between cuda:0 and the CPU. Everything lands in
# OUT as JSONL plus gpu_check.log; each part has its own time limit so the whole fits in 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUT             # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT --dry-run   # CPU shapes, about a minute (tests/test_gpu_check.py)
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

{ date -u; $py -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; nvidia-smi 2>/dev/null | head -15; } >>"$log" 2>&1

if [ "$dry" = "--dry-run" ]; then
  part kernels 300 $py benchmarks/gpu_kernels.py --out "$out/kernels.jsonl" --dry-run
  part attention 300 $py benchmarks/bench_attention.py --device cpu --quick --out "$out/attention.jsonl"
  part model 300 $py benchmarks/gpu_model.py bench --dry-run --out "$out/model.jsonl"
  part split 300 $py benchmarks/gpu_model.py split --dry-run --out "$out/split.jsonl"
  part paged 300 $py benchmarks/gpu_paged.py --dry-run --out "$out/paged.jsonl"
else
  part kernels 100 $py benchmarks/gpu_kernels.py --out "$out/kernels.jsonl"
  part paged 60 $py benchmarks/gpu_paged.py --out "$out/paged.jsonl"
  part split 60 $py benchmarks/gpu_model.py split --out "$out/split.jsonl"
  part model 90 $py benchmarks/gpu_model.py bench --length 32768 --layers 4 --out "$out/model.jsonl"
  part attention 170 $py benchmarks/bench_attention.py --device cuda --lengths 32768,65536,131072 \
    --shapes llama3-8b,embedded --methods sdpa,triton,flex,naive --out "$out/attention.jsonl"
fi
echo "gpu_check: $( [ $status -eq 0 ] && echo 'all parts passed' || echo 'some parts FAILED' ) ($log)" | tee -a "$log"
exit $status
