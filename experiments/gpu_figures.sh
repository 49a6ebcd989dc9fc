#!/usr/bin/env bash
# The GPU figures issue 18 asks for, in one script (about 10 minutes on an H200); results under ${OUT:-runs/gpu}.
#   OUT=runs/gpu bash experiments/gpu_figures.sh ../shared/data/flowers5_128
# 1. inference modes against fp32 on the same device, TF32 off/on; fit per input path on 2,048 training images
# 2. fit vs the in-memory step rate for Lite0 and the three-trunk fusion, both input paths
# 3. Lite0 fine-tuned on flowers5_128 at 128 px with the HyperRule budget and EMA (best epoch by validation NLL)
set -euo pipefail
DATA=${1:?the flowers5_128 folder}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python experiments/bench_throughput.py --device cuda --batch 256 --train-batch 64 --train-images 2048 \
  --workers 12 --out "$OUT/bench_throughput.json" > "$OUT/bench_throughput.log" 2>&1
for b in "efficientnet_lite0" "efficientnet_lite0 efficientnet_lite1 efficientnet_lite2"; do
  python experiments/bench_fit_input.py --data "$DATA" --device cuda --size 128 --images 2935 --batch 64 \
    --workers 12 --backbones $b --out "$OUT/bench_fit_input_${b// /+}.json" >> "$OUT/bench_fit_input.log" 2>&1
done
python -m fusionnet.cli.main train --data "$DATA" --backbones efficientnet_lite0 --size 128 --budget hyperrule \
  --ema-decay 0.998 --monitor nll --device cuda --workers 12 --no-progress --out "$OUT/lite0_hyperrule" \
  > "$OUT/lite0_hyperrule.log" 2>&1
python -m fusionnet.cli.main predict "$OUT/lite0_hyperrule/best.pth" --data "$DATA" --split test \
  --out "$OUT/lite0_hyperrule/test.pt" >> "$OUT/lite0_hyperrule.log" 2>&1
