#!/usr/bin/env bash
# The GPU check as one prepared script: install (as `make install`), show the device, run a
# short demo round per site on the GPU with bf16 + ZeRO-2, check losses and the merge against
# CPU, print tokens/s and MFU; with several GPUs, also a ZeRO-3 site of one rank per GPU whose
# update is compared with the CPU's. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
make install >/dev/null
.venv/bin/python benchmarks/gpu_check.py --device cuda "$@"
