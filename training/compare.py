"""Selective fine-tuning compared: strategies × scenarios × seeds, and the comparison table.

Every run is an ordinary fine-tuning run directory (training/finetune.py) inside `run_dir`, so the
sweep resumes run by run; a variant that cannot run (e.g. `located` for a language without located
units) is recorded with the reason, not dropped. `write_comparison` writes comparison.json/.md/.png
into `run_dir`, whose config is checked like every run directory's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

from training import paths
from training.config import RunDir, atomic_write_json, atomic_write_text
from training.finetune import SCENARIOS, FinetuneConfig, finetune

# name → FinetuneConfig overrides. The random subsets match LAPE (neurons, LAPE fine-tuning's baseline) and
# last-k (whole blocks, LinguaMap's "random layers fail").
VARIANTS = {
    "full": {"strategy": "full"},
    # Every transformer block but not the (tied) embeddings: separates "train the blocks" from "train
    # the vocabulary", which only `full` does. `last_k` is filled with the model's depth.
    "all-blocks": {"strategy": "last-k", "last_k": None},
    "embeddings": {"strategy": "embeddings"},  # the tied embedding / LM head (+ positions) alone
    "last-k": {"strategy": "last-k"},
    "outermost": {"strategy": "outermost"},
    "lape": {"strategy": "lape"},
    "located": {"strategy": "located"},
    "lora": {"strategy": "lora"},
    "random~lape": {"strategy": "random", "random_reference": "lape"},
    "random~last-k": {"strategy": "random", "random_reference": "last-k"},
}


@dataclass
class CompareConfig:
    """Run the fine-tuning comparison and write the table."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "pretrained model"})
    located: str = field(default=paths.LOCATED_WITH_EU, metadata={"help": "located-units file"})
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS), metadata={"help": "scenarios"})
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": f"of {', '.join(VARIANTS)}"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds"})
    max_steps: int = field(default=150, metadata={"help": "optimizer steps per run"})
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate for every run (default: FinetuneConfig's)"}
    )
    run_dir: str = field(
        default=paths.FINETUNE_RUNS,
        metadata={"help": "run directory: one fine-tuning run per variant inside, and the comparison table"},
    )
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})


def n_layers(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["n_layer"]


def run_all(config: CompareConfig) -> list[dict]:
    rows = []
    lr_tag = "" if config.lr is None else f"-lr{config.lr:g}"
    for scenario in config.scenarios:
        for variant in config.variants:
            for seed in config.seeds:
                overrides = {
                    "model_dir": config.model_dir,
                    "located": config.located,
                    "scenario": scenario,
                    "seed": seed,
                    "max_steps": config.max_steps,
                    "eval_every": config.max_steps,
                    "ckpt_every": config.max_steps,
                    **VARIANTS[variant],
                    "run_dir": str(Path(config.run_dir) / f"{scenario}-{variant}-{seed}{lr_tag}"),
                }
                if config.lr is not None:
                    overrides["lr"] = config.lr
                if overrides.get("last_k", 0) is None:
                    overrides["last_k"] = n_layers(config.model_dir)
                if config.corpus_dir:
                    overrides["corpus_dir"] = config.corpus_dir
                try:
                    summary = finetune(dataclasses.replace(FinetuneConfig(), **overrides))
                except ValueError as error:  # e.g. no located units for the target language
                    rows.append(
                        {"scenario": scenario, "variant": variant, "seed": seed, "skipped": str(error)}
                    )
                    print(f"{scenario} {variant} seed {seed}: skipped ({error})")
                    continue
                rows.append(
                    {
                        "scenario": scenario,
                        "variant": variant,
                        "seed": seed,
                        "metric": summary["metric"],
                        "target_before": summary["target_before"],
                        "target_after": summary["target_after"],
                        "forgetting": summary["forgetting"],
                        "trainable": summary["parameters"]["trainable"],
                        "share": summary["parameters"]["share"],
                        "train_time_s": summary["train_time_s"],
                        "run_dir": summary["run_dir"],
                    }
                )
    return rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict]) -> list[dict]:
    """One line per scenario × variant: mean ± sd over seeds, and the share of full FT's gain reached."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        done = [r for r in rows if r["scenario"] == scenario and "skipped" not in r]
        full_gain = None
        full_rows = [r for r in done if r["variant"] == "full"]
        if full_rows:
            full_gain = mean(r["target_after"] - r["target_before"] for r in full_rows)
        for variant in dict.fromkeys(r["variant"] for r in rows if r["scenario"] == scenario):
            group = [r for r in done if r["variant"] == variant]
            if not group:
                reason = next(
                    r["skipped"] for r in rows if r["scenario"] == scenario and r["variant"] == variant
                )
                lines.append({"scenario": scenario, "variant": variant, "skipped": reason})
                continue
            gain = mean(r["target_after"] - r["target_before"] for r in group)
            lines.append(
                {
                    "scenario": scenario,
                    "variant": variant,
                    "seeds": len(group),
                    "metric": group[0]["metric"],
                    "target_before": mean(r["target_before"] for r in group),
                    "target_after": _mean_sd([r["target_after"] for r in group]),
                    "gain_vs_full": gain / full_gain if full_gain else None,
                    "forgetting": _mean_sd([r["forgetting"] for r in group]),
                    "trainable_share": group[0]["share"],
                    "trainable": group[0]["trainable"],
                    "train_time_s": _mean_sd([r["train_time_s"] for r in group]),
                    # The machine is shared; the fastest seed is the least disturbed measurement.
                    "train_time_min_s": min(r["train_time_s"] for r in group),
                }
            )
    return lines


def markdown(lines: list[dict]) -> str:
    out = [
        "| scenario | strategy | target metric before | after (mean ± sd) | gain / full FT's "
        "| forgetting (Δ loss) "
        "| trainable % | train time s (fastest seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        if "skipped" in line:
            out.append(f"| {line['scenario']} | {line['variant']} | — | not run: {line['skipped']} | | | | |")
            continue
        after, forgetting, seconds = line["target_after"], line["forgetting"], line["train_time_s"]
        gain = "" if line["gain_vs_full"] is None else f"{line['gain_vs_full']:.2f}"
        out.append(
            f"| {line['scenario']} | {line['variant']} | {line['target_before']:.3f} | {after[0]:.3f} ± "
            f"{after[1]:.3f} "
            f"| {gain} | {forgetting[0]:+.3f} ± {forgetting[1]:.3f} | {100 * line['trainable_share']:.2f} "
            f"| {seconds[0]:.0f} ± {seconds[1]:.0f} ({line['train_time_min_s']:.0f}) |"
        )
    return "\n".join(out) + "\n"


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(line["scenario"] for line in lines))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        group = [line for line in lines if line["scenario"] == scenario and "skipped" not in line]
        for line in group:
            x, (y, sd) = 100 * line["trainable_share"], line["target_after"]
            ax.errorbar(x, y, yerr=sd, fmt="o", capsize=3)
            ax.annotate(line["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if group:
            ax.axhline(group[0]["target_before"], color="grey", ls="--", lw=1, label="before fine-tuning")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (%)")
        ax.set_ylabel(
            "target-language loss"
            if group and group[0]["metric"] == "target_loss"
            else "language consistency"
        )
        ax.set_title(scenario)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_finetuning(config: CompareConfig) -> list[dict]:
    """Run (or read back) every fine-tuning run and write the table; returns its lines."""
    run = RunDir.open(config.run_dir, config, may_change=("scenarios", "variants", "seeds"))
    rows = run_all(config)
    lines = table(rows)
    atomic_write_json(
        run.path / "comparison.json", {"config": dataclasses.asdict(config), "runs": rows, "table": lines}
    )
    atomic_write_text(run.path / "comparison.md", markdown(lines))
    plot(lines, run.path / "comparison.png")
    return lines
