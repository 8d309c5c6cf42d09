"""Learning-rate probe: a finished pretraining run re-run with other learning rates, all else equal.

    python benchmarks/lr_probe.py --run-config runs/scaling-sweep/4x128/15min/config.json \
        --lrs 3e-3,1e-2 --run-dir runs/lr-probe

Each probe is an ordinary pretraining run (`<run-dir>/lr<lr>/`, resumable) with the reference run's
config, its learning rate replaced and `branch_from` cleared (a sweep read that was a decay branch is the
same run trained on its own). The reference's packed data is copied, not rebuilt. Prints and writes
held-out nats/char per language (`probes.md`); docs/pretraining.md holds the measured numbers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from training.config import RunDir, atomic_write_text, config_from_dict, parse_config, run_main
from training.pretrain import PretrainConfig, pretrain


@dataclass
class LRProbeConfig:
    """Re-run a pretraining run at other learning rates."""

    run_config: str = field(default="", metadata={"help": "config.json of the reference pretraining run"})
    lrs: list[float] = field(default_factory=lambda: [3e-3], metadata={"help": "learning rates to probe"})
    run_dir: str = field(default="runs/lr-probe", metadata={"help": "one sub-run per learning rate"})


def main(argv: list[str]) -> None:
    args = parse_config(LRProbeConfig, argv)
    run = RunDir.open(args.run_dir, args, may_change=("lrs",))
    reference = json.loads(Path(args.run_config).read_text())
    lines = ["| lr | " + " | ".join(["nats/char per language", "mean"]) + " |", "|---|---|---|"]
    for lr in args.lrs:
        probe_dir = run.path / f"lr{lr:g}"
        data = Path(reference["run_dir"]) / "data"
        if data.exists() and not (probe_dir / "data" / "meta.json").exists():
            shutil.copytree(data, probe_dir / "data", dirs_exist_ok=True)
        config = config_from_dict(
            PretrainConfig, {**reference, "run_dir": str(probe_dir), "lr": lr, "branch_from": None}
        )
        nats = pretrain(config)["validation_nats_per_char"]
        trained = sorted(json.loads((probe_dir / "data" / "meta.json").read_text())["mixture"])
        mean = sum(nats[lang] for lang in trained) / len(trained)
        lines.append(f"| {lr:g} | " + ", ".join(f"{l} {nats[l]:.3f}" for l in trained) + f" | {mean:.4f} |")
        print(lines[-1], flush=True)
    atomic_write_text(run.path / "probes.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
