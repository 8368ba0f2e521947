#!/usr/bin/env bash
# Real-size GPU check (benchmarks/gpu.py): builds the random real-size checkpoint, then caption, asr, tts and
# imagine at 4bit, 8bit, bf16 and the reference's way (fp16, all loaded). Figures to stdout and $OUT/gpu.json.
#   benchmarks/gpu.sh [--model DIR] [--choices 4bit,bf16]      on a CUDA machine, from the repository root
#   benchmarks/gpu.sh --dry-run                                 tiny checkpoint on the CPU (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'this torch sees no CUDA device')"
fi
export OUT="${OUT:-$PWD}"
# the whole check is sized for 8 minutes; stop it at 9 rather than hold the machine
exec timeout 540 python benchmarks/gpu.py "$@"
