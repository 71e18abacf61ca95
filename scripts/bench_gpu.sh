#!/usr/bin/env bash
# The GPU measurements of the performance issue in one go, one JSON line per result on stdout:
#   1. `dynamicrafter bench` at 256x256, 320x512 and 576x1024: random weights, fp16, 50 steps, batch 1
#      (with COMPILE=1 each resolution runs a second time with --compile);
#   2. one UNet call of each full-size architecture at its resolution in fp32 (TF32 off) and in fp16, same random
#      weights and inputs: relative max error and finiteness.
# Usage: scripts/bench_gpu.sh > gpu.jsonl
# The same run on the CPU at a toy size, to check the script itself:
#   MODELS=tiny DEVICE=cpu DTYPE=fp32 LOW=bf16 STEPS=2 scripts/bench_gpu.sh
set -euo pipefail

MODELS=${MODELS:-"256 512 1024"}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp16}   # the benchmark runs
LOW=${LOW:-fp16}       # the precision check: LOW against fp32
STEPS=${STEPS:-50}
COMPILE=${COMPILE:-0}

for model in $MODELS; do
    random=$([ "$model" = tiny ] || echo --random-weights)
    dynamicrafter bench --model "$model" $random --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" --batch 1 --json
    if [ "$COMPILE" = 1 ]; then
        dynamicrafter bench --model "$model" $random --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" --batch 1 \
            --compile --json
    fi
done

MODELS="$MODELS" DEVICE="$DEVICE" LOW="$LOW" python - <<'PY'
import json
import os

import torch

from dynamicrafter.bench import unet_precision
from dynamicrafter.presets import get_preset

dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[os.environ["LOW"]]
for name in os.environ["MODELS"].split():
    preset = get_preset(name)
    result = unet_precision(preset, preset.height, preset.width, os.environ["DEVICE"], dtype)
    print(json.dumps(result), flush=True)
    if os.environ["DEVICE"].startswith("cuda"):
        torch.cuda.empty_cache()
PY
