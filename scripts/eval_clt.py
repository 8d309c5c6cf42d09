"""Evaluate a trained transcoder: per-layer FVU, L0 and dead fraction on stored activations, and the
replacement model (every MLP replaced) vs the real model — KL, Δ-CE, top-1 agreement, per language.

    python scripts/eval_clt.py --clt runs/clt-tiny-en-heavy/clt --model-dir runs/pretrain-tiny-en-heavy/model
    \
        --store runs/activations/tiny-en-heavy.zarr --run-dir runs/eval-clt

The logic is `clt.evaluate.evaluate_clt`.
"""

import json

from clt.evaluate import EvalConfig, evaluate_clt
from clt.train import format_summary
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    config = parse_config(EvalConfig, argv)
    report = evaluate_clt(config)
    print(format_summary(report))
    print(
        f"report written to {config.run_dir}/summary.json"
        if config.run_dir
        else json.dumps(report["replacement"]["all"], indent=1)
    )


if __name__ == "__main__":
    run_main(main)
