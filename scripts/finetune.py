"""Fine-tune a pretrained model on a named scenario with a parameter-selection strategy.

    python scripts/finetune.py --scenario adapt-eu --strategy lape --run-dir runs/finetune/adapt-eu-lape-0
    python scripts/finetune.py --scenario consistency --strategy last-k --last-k 1 --seed 1 --run-dir ...
    torchrun --nproc-per-node N scripts/finetune.py ...   # data-parallel

Strategies: full, last-k, outermost, lape, located, lora, random (matched to --random-reference).
`lape` and `located` read the units of `--located` (from scripts/locate_language.py, run with the
scenario's target languages). The run directory gets the fine-tuned model (`model/`), `summary.json`
(target metric before/after, forgetting, trainable share, wall time) and the usual config/metrics.
"""

import json

from training.config import parse_config, run_main
from training.finetune import FinetuneConfig, finetune


def main(argv: list[str]) -> None:
    summary = finetune(parse_config(FinetuneConfig, argv))
    if not summary:
        return  # a non-zero torchrun rank
    keys = (
        "scenario",
        "strategy",
        "seed",
        "metric",
        "target_before",
        "target_after",
        "forgetting",
        "parameters",
        "train_time_s",
        "run_dir",
    )
    print(json.dumps({key: summary[key] for key in keys}, indent=1))


if __name__ == "__main__":
    run_main(main)
