"""Models side by side on the same held-out text: nats/char, greedy and sampled continuations of the
same prompts (CLD2 consistency, distinct-token share) and a sample table.

    python scripts/evaluate_models.py --model-dirs runs/tiny-balanced/model,models/base-balanced/model \
        --names tiny,base --corpus-dir data/corpus-all --run-dir runs/eval-tiny-vs-base

Writes results.json and report.md in the run directory. The logic is `training.model_eval`.
"""

from training.config import parse_config, run_main
from training.model_eval import ModelEvalConfig, run_model_eval


def main(argv: list[str]) -> None:
    results = run_model_eval(parse_config(ModelEvalConfig, argv))
    print(f"{len(results['models'])} models evaluated on {len(results['langs'])} languages")


if __name__ == "__main__":
    run_main(main)
