#!/usr/bin/env bash
# The GPU path, proved in one go on a machine with a CUDA device and the MNIST files (about 5 minutes on
# one H200): the tests marked `cuda`, then the benchmark (tutorial, floor, ours fp32 and bf16) and its table.
#
#   bash tests/gpu_check.sh [DATA_DIR]      # DATA_DIR holds MNIST/raw (default: ./mnist)
#
# It uses the python3 that has torch (override with PYTHON=...); results also go to $OUT if that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-mnist}
python=${PYTHON:-python3}
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
              torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
timeout 240 "$python" -m pytest -q -m cuda -rs -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.txt"
timeout 360 "$python" tests/benchmark.py --device cuda --repeats 3 --data-dir "$data" \
    --json "$out/gpu_benchmark.json" 2>&1 | tee "$out/gpu_benchmark.txt"
