"""Pretrain a GPT-2-style model on a language mixture. `--help` lists every option.

Single process:  python scripts/pretrain.py --mixture balanced --run-dir runs/tiny-balanced
Data-parallel:   torchrun --nproc-per-node 2 scripts/pretrain.py ...
"""

import json

from training.config import parse_config, run_main
from training.pretrain import PretrainConfig, pretrain


def main(argv: list[str]) -> None:
    summary = pretrain(parse_config(PretrainConfig, argv))
    if summary:
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in (
                        "run_dir",
                        "validation_loss",
                        "language_consistency",
                        "tokens_per_s_median",
                        "wall_time_s",
                    )
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    run_main(main)
