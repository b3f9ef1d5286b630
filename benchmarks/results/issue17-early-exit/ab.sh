#!/bin/bash
# A/B on a 2,000-sample subset: EE without and with distillation, one after the other, then evaluation
set -x
cd /work/main
export HF_HUB_OFFLINE=1
R=/work/runs/early-exit
.venv/bin/adaptinf convert minilm-l6 --method ee --max-train-samples 2000 --epochs 2 --threads 1 --no-progress --out $R/ee-2k > $R/ee-2k.log 2>&1
.venv/bin/adaptinf convert minilm-l6 --method ee --set distill_weight=1.0 --set distill_temperature=2.0 --max-train-samples 2000 --epochs 2 --threads 1 --no-progress --out $R/ee-2k-distill > $R/ee-2k-distill.log 2>&1
.venv/bin/adaptinf evaluate $R/ee-2k $R/ee-2k-distill --split both --refine 3 --threads 1 --no-progress --out $R/points-ee-2k > $R/eval-ee-2k.log 2>&1
echo done
