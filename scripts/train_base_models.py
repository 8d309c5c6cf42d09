"""The base models of every mixture, end to end and resumable: pretraining at a wall-clock budget, CLT,
located language units, and with `--stages ...,release` the release under models/.

    python scripts/train_base_models.py --runs-dir runs/base --minutes 60
    python scripts/train_base_models.py --runs-dir runs/base --stages release

Every stage is an ordinary run directory under <runs-dir>/<mixture>/; `--help` lists every option,
including the composed ones (--pretrain-*, --clt-*, --locate-*). The logic is `training.base_models`.
"""

import json

from training.base_models import BaseModelsConfig, run_base_models
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    results = run_base_models(parse_config(BaseModelsConfig, argv))
    print(json.dumps({m: sorted(stages) for m, stages in results.items()}))


if __name__ == "__main__":
    run_main(main)
