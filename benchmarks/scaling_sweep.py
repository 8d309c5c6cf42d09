"""Scaling sweep: held-out nats/char of several model shapes at 15/30/60-minute budgets on this machine.

    python benchmarks/scaling_sweep.py --corpus-dir data/corpus-all --run-dir runs/scaling-sweep

One WSD run per shape, shorter budgets read off decay branches (see training/scaling.py). Resumable: rerun
the same command after a kill. Writes results.json, report.md and scaling.png in the run directory;
docs/pretraining.md holds the measured numbers.
"""

from __future__ import annotations

import json

from training.config import parse_config, run_main
from training.scaling import SweepConfig, run_sweep


def main(argv: list[str] | None = None) -> None:
    results = run_sweep(parse_config(SweepConfig, argv))
    print(json.dumps(results["best_shape_per_budget"], indent=1))


if __name__ == "__main__":
    run_main(main)
