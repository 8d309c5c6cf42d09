"""Default paths of the main job's artifacts — the one place that names them.

Every config's default points here, so the tiny English-heavy pipeline (`scripts/train_clt.py`, then
`locate_language.py`, `steer.py`, ...) chains without flags. Pass `--model-dir`, `--clt`, ... to use
other artifacts.
"""

RUNS = "runs"
PRETRAIN_RUN_DIR = f"{RUNS}/pretrain-tiny-en-heavy"
MODEL_DIR = f"{PRETRAIN_RUN_DIR}/model"
STORE = f"{RUNS}/activations/tiny-en-heavy.zarr"
CLT_RUN_DIR = f"{RUNS}/clt-tiny-en-heavy"
CLT_DIR = f"{CLT_RUN_DIR}/clt"
LOCATE_RUN_DIR = f"{RUNS}/locate-tiny-en-heavy"
LOCATED = f"{LOCATE_RUN_DIR}/located.json"
# Fine-tuning needs Basque units: located on the en-heavy model with eu among the languages.
LOCATED_WITH_EU = f"{RUNS}/locate-tiny-en-heavy-eu/located.json"
FINETUNE_RUNS = f"{RUNS}/finetune"
