"""Strategies × scenarios × seeds of selective fine-tuning, and the comparison table.

    python scripts/compare_finetuning.py                      # the table in docs/finetuning.md
    python scripts/compare_finetuning.py --seeds 0 --max-steps 30 --run-dir runs/finetune-quick

Every run is an ordinary `scripts/finetune.py` run directory inside `--run-dir` (finished runs are
read back, interrupted ones resume), so the sweep can be killed and restarted. Writes
`comparison.json`, `comparison.md` and `comparison.png` to `--run-dir`. The logic is
`training.compare.compare_finetuning`.
"""

from training.compare import CompareConfig, compare_finetuning, markdown, outcome_markdown
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    lines = compare_finetuning(parse_config(CompareConfig, argv))
    print(markdown(lines))
    print(outcome_markdown(lines))


if __name__ == "__main__":
    run_main(main)
