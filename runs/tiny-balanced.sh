#!/usr/bin/env bash
# #13: the tiny balanced model with the tiny recipe of scripts/reproduce.py (SCALES["tiny"]["models"]),
# then its 12-pair steering frontier (the tiny en-heavy pilot's settings). 1 thread. Resumable.
set -eu
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 MLCLT_THREADS_PER_RANK=1
python scripts/train_base_models.py --runs-dir runs/tiny-models --mixtures balanced --stages pretrain,clt,locate \
  --minutes 8 --pretrain-preset tiny --pretrain-n-ctx 128 --pretrain-vocab-size 8192 \
  --clt-train-tokens 1000000 --clt-n-features 512 --clt-sparsity-coefficient 1.0 --clt-compile false \
  --clt-collect-n-tokens 400000 --clt-collect-n-ctx 64
B=runs/tiny-models/balanced
python scripts/steer.py --model-dir $B/pretrain/model --clt $B/clt/clt --located $B/locate/located.json \
  --pairs all --langs en,fr,de,ru --decodings greedy --run-dir runs/steer-frontier-tiny-balanced
