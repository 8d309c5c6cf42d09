#!/usr/bin/env bash
# #14: selective fine-tuning judged on the LinguaMap protocol, base en-heavy (docs/linguamap.md). 1 thread, resumable.
set -eu
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 MLCLT_THREADS_PER_RANK=1
python scripts/compare_finetuning.py --scenarios linguamap --linguamap-data runs/linguamap-data \
  --model-dir models/base-en-heavy --located models/base-en-heavy --lrs 1e-4,3e-4,1e-3,3e-3,1e-2 \
  --sweep-seeds 1 --seeds 0,1,2 --n-ctx 256 --linguamap-items 40 \
  --variants full,last-k,outermost,lape,located,lora,random~last-k,random~lape \
  --run-dir runs/finetune-linguamap-base-en-heavy
