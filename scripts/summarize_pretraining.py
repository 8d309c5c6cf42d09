"""Markdown tables comparing pretraining runs (from their summary.json), for docs/.

    python scripts/summarize_pretraining.py --runs runs/pretrain-tiny-en-heavy,runs/tiny-balanced

The logic is `training.pretrain.summarize_runs`.
"""

from training.config import parse_config, run_main
from training.pretrain import SummarizeConfig, summarize_runs


def main(argv: list[str]) -> None:
    print(summarize_runs(parse_config(SummarizeConfig, argv).runs))


if __name__ == "__main__":
    run_main(main)
