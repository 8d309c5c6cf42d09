"""Selective fine-tuning compared: strategies × scenarios × seeds, and the comparison table.

Every run is an ordinary fine-tuning run directory (training/finetune.py) inside `run_dir`, so the
sweep resumes run by run; a variant that cannot run (e.g. `located` for a language without located
units) is recorded with the reason, not dropped. `write_comparison` writes comparison.json/.md/.png
into `run_dir`, whose config is checked like every run directory's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

from analysis.linguamap import OUTCOMES
from training import paths
from training.config import RunDir, atomic_write_json, atomic_write_text
from training.finetune import SCENARIOS, FinetuneConfig, finetune, linguamap_summary

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
    # outermost's size-matched control: as many blocks, none of the outermost ones (the middle blocks)
    "random~outermost": {"strategy": "random", "random_reference": "outermost"},
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
    lrs: list[float] = field(
        default_factory=list,
        metadata={
            "help": "peak learning rates to sweep per strategy (default: FinetuneConfig's lr only); each "
            "strategy's is chosen on validation data where the scenario has it (linguamap)"
        },
    )
    sweep_seeds: int = field(
        default=0,
        metadata={
            "help": "sweep the learning rates on the first N seeds only, then run the other seeds at each "
            "strategy's chosen rate (0 = every seed at every rate)"
        },
    )
    n_ctx: int = field(default=0, metadata={"help": "fine-tuning block length (0 = the model's context)"})
    finished_only: bool = field(
        default=False,
        metadata={
            "help": "run nothing: write the table from the runs that have finished so far (a partial table "
            "says how many are pending)"
        },
    )
    run_dir: str = field(
        default=paths.FINETUNE_RUNS,
        metadata={"help": "run directory: one fine-tuning run per variant inside, and the comparison table"},
    )
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    linguamap_data: str = field(
        default="",
        metadata={"help": "linguamap scenario: directory from scripts/linguamap.py --finetune-data"},
    )
    linguamap_items: int = field(
        default=100, metadata={"help": "linguamap scenario: validation / test items evaluated per cell"}
    )
    target_langs: list[str] = field(
        default_factory=list, metadata={"help": "target languages ('' = each scenario's)"}
    )


def n_layers(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["n_layer"]


def run_all(config: CompareConfig) -> list[dict]:
    """Every (scenario, variant, learning rate, seed) fine-tuning run, one row each. With `sweep_seeds`,
    a variant's other seeds run only at the rate its sweep seeds chose (`choose_lr`, as the table does)."""
    rows: list[dict] = []
    before_of: dict[str, Path] = {}  # scenario → a finished run's before.json
    lrs = config.lrs or [None]
    sweep = config.seeds[: config.sweep_seeds] if config.sweep_seeds and len(lrs) > 1 else config.seeds
    for scenario in config.scenarios:
        for variant in config.variants:
            mine = [run_one(config, scenario, variant, lr, seed, before_of) for lr in lrs for seed in sweep]
            rows += mine
            rest = [seed for seed in config.seeds if seed not in sweep]
            done = [r for r in mine if "skipped" not in r and "pending" not in r]
            if rest and done:
                lr = choose_lr(done)
                rows += [run_one(config, scenario, variant, lr, seed, before_of) for seed in rest]
    return rows


def run_one(
    config: CompareConfig, scenario: str, variant: str, lr: float | None, seed: int, before_of: dict
) -> dict:
    key = {"scenario": scenario, "variant": variant, "seed": seed, "lr": lr}
    run = run_config(config, scenario, variant, lr, seed)
    if config.finished_only and not (Path(run.run_dir) / "summary.json").exists():
        return {**key, "pending": True}
    reuse_before(run, before_of.get(scenario))
    try:
        summary = finetune(run)
    except ValueError as error:  # e.g. no located units for the target language
        print(f"{scenario} {variant} lr {lr} seed {seed}: skipped ({error})")
        return {**key, "skipped": str(error)}
    before_of.setdefault(scenario, Path(summary["run_dir"]) / "before.json")
    return {
        **key,
        "validation_after": summary.get("validation_after"),
        "linguamap_after": summary.get("linguamap_after"),
        "linguamap_by_scenario": _by_scenario(summary, "after"),
        "linguamap_before_by_scenario": _by_scenario(summary, "before"),
        "metric": summary["metric"],
        "target_before": summary["target_before"],
        "target_after": summary["target_after"],
        "forgetting": summary["forgetting"],
        "trainable": summary["parameters"]["trainable"],
        "share": summary["parameters"]["share"],
        "train_time_s": summary["train_time_s"],
        "run_dir": summary["run_dir"],
    }


def _by_scenario(summary: dict, when: str) -> dict | None:
    """The protocol's outcome shares per prompt scenario (test items, means over languages): the
    issue's table is per strategy *and* scenario, which the run's one summary over cells hides."""
    cells = (summary.get(when) or {}).get("linguamap", {}).get("test")
    if not cells:
        return None
    return {
        scenario: linguamap_summary([c for c in cells if c["scenario"] == scenario])
        for scenario in sorted({c["scenario"] for c in cells})
    }


def choose_lr(rows: list[dict]) -> float | None:
    """One variant's learning rate: the best mean validation metric (linguamap), else the best reported
    metric, over the seeds that every rate ran — so extra seeds run at the chosen rate cannot change the
    choice that picked them."""
    by_lr: dict = {}
    for r in rows:
        by_lr.setdefault(r.get("lr"), []).append(r)
    common = set.intersection(*({r["seed"] for r in group} for group in by_lr.values()))
    sign = -1 if rows[0]["metric"] == "target_loss" else 1

    def value(group: list[dict]) -> float:
        picked = [r for r in group if r["seed"] in common] or group
        return sign * mean(
            r["validation_after"] if r.get("validation_after") is not None else r["target_after"]
            for r in picked
        )

    return max(by_lr, key=lambda lr: value(by_lr[lr]))


def reuse_before(run: FinetuneConfig, before: Path | None) -> None:
    """The pretrained model's evaluation is the same for every run of a scenario (same model, validation
    blocks, prompts and items; the learning rate, strategy and seed only act after it): copy it instead
    of recomputing it for each of the sweep's runs."""
    target = Path(run.run_dir) / "before.json"
    if before is not None and before.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(before, target)


def run_config(
    config: CompareConfig, scenario: str, variant: str, lr: float | None, seed: int
) -> FinetuneConfig:
    lr_tag = "" if lr is None else f"-lr{lr:g}"
    overrides = {
        "model_dir": config.model_dir,
        "located": config.located,
        "scenario": scenario,
        "seed": seed,
        "max_steps": config.max_steps,
        "eval_every": config.max_steps,
        "ckpt_every": config.max_steps,
        "n_ctx": config.n_ctx,
        **VARIANTS[variant],
        "run_dir": str(Path(config.run_dir) / f"{scenario}-{variant}-{seed}{lr_tag}"),
    }
    if lr is not None:
        overrides["lr"] = lr
    if overrides.get("last_k", 0) is None:
        overrides["last_k"] = n_layers(config.model_dir)
    if config.corpus_dir:
        overrides["corpus_dir"] = config.corpus_dir
    if config.linguamap_data:
        overrides["linguamap_data"] = config.linguamap_data
        overrides["linguamap_items"] = config.linguamap_items
    if config.target_langs:
        overrides["target_langs"] = config.target_langs
    return dataclasses.replace(FinetuneConfig(), **overrides)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict]) -> list[dict]:
    """One line per scenario × variant × learning rate: mean ± sd over seeds, the share of full FT's
    gain reached (at full FT's chosen rate), and `chosen` on the rate each variant would be run at —
    the best mean validation metric (linguamap), else the best reported metric (said in the table)."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        done = [r for r in rows if r["scenario"] == scenario and "skipped" not in r]
        groups: dict[tuple, list[dict]] = {}
        for r in done:
            groups.setdefault((r["variant"], r.get("lr")), []).append(r)
        chosen = {
            variant: choose_lr([r for r in done if r["variant"] == variant])
            for variant in dict.fromkeys(r["variant"] for r in done)
        }
        full_gain = None
        if "full" in chosen:
            full_rows = groups[("full", chosen["full"])]
            full_gain = mean(r["target_after"] - r["target_before"] for r in full_rows)
        for variant in dict.fromkeys(r["variant"] for r in rows if r["scenario"] == scenario):
            if variant not in chosen:
                reason = next(
                    r["skipped"] for r in rows if r["scenario"] == scenario and r["variant"] == variant
                )
                lines.append({"scenario": scenario, "variant": variant, "skipped": reason})
                continue
            for (name, lr), group in groups.items():
                if name != variant:
                    continue
                gain = mean(r["target_after"] - r["target_before"] for r in group)
                line = {
                    "scenario": scenario,
                    "variant": variant,
                    "lr": lr,
                    "chosen": lr == chosen[variant],
                    "chosen_on": "validation"
                    if group[0].get("validation_after") is not None
                    else "reported metric",
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
                if group[0].get("linguamap_after"):
                    line["accuracy_likelihood"] = _mean_sd(
                        [r["linguamap_after"]["likelihood"]["correct"] for r in group]
                    )
                    line["outcomes_generation"] = {
                        o: mean(r["linguamap_after"]["generation"][o] for r in group)
                        for o in r["linguamap_after"]["generation"]
                    }
                if all(r.get("linguamap_by_scenario") for r in group):
                    line["outcomes_by_scenario"] = {
                        scenario: {
                            mode: {
                                o: _mean_sd([r["linguamap_by_scenario"][scenario][mode][o] for r in group])
                                for o in OUTCOMES
                            }
                            for mode in ("generation", "likelihood")
                        }
                        for scenario in group[0]["linguamap_by_scenario"]
                    }
                    line["outcomes_before_by_scenario"] = group[0]["linguamap_before_by_scenario"]
                lines.append(line)
    return lines


def markdown(lines: list[dict]) -> str:
    out = [
        "| scenario | strategy | lr | target metric before | after (mean ± sd) | gain / full FT's "
        "| forgetting (Δ loss) "
        "| trainable % | train time s (fastest seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        if "skipped" in line:
            out.append(
                f"| {line['scenario']} | {line['variant']} | | — | not run: {line['skipped']} | | | | |"
            )
            continue
        after, forgetting, seconds = line["target_after"], line["forgetting"], line["train_time_s"]
        gain = "" if line["gain_vs_full"] is None else f"{line['gain_vs_full']:.2f}"
        lr = "default" if line.get("lr") is None else f"{line['lr']:g}"
        mark = (
            " ✓"
            if line.get("chosen") and len([x for x in lines if x.get("variant") == line["variant"]]) > 1
            else ""
        )
        if line["seeds"] > 1:
            after_text = f"{after[0]:.3f} ± {after[1]:.3f}"
            forgetting_text = f"{forgetting[0]:+.3f} ± {forgetting[1]:.3f}"
            seconds_text = f"{seconds[0]:.0f} ± {seconds[1]:.0f} ({line['train_time_min_s']:.0f})"
        else:  # one seed has no spread: say so instead of printing ± 0
            after_text = f"{after[0]:.3f} (1 seed)"
            forgetting_text = f"{forgetting[0]:+.3f}"
            seconds_text = f"{seconds[0]:.0f}"
        out.append(
            f"| {line['scenario']} | {line['variant']} | {lr}{mark} | {line['target_before']:.3f} "
            f"| {after_text} | {gain} | {forgetting_text} | {100 * line['trainable_share']:.2f} "
            f"| {seconds_text} |"
        )
    if any(
        line.get("chosen_on") == "reported metric" and len({x.get("lr") for x in lines}) > 1 for line in lines
    ):
        out.append("")
        out.append(
            "✓ = the learning rate chosen for each strategy; without a validation split it is chosen on "
            "the reported metric itself."
        )
    elif any(line.get("chosen") for line in lines) and len({x.get("lr") for x in lines}) > 1:
        out.append("")
        out.append("✓ = the learning rate chosen for each strategy on the validation items.")
    return "\n".join(out) + "\n"


def outcome_markdown(lines: list[dict]) -> str:
    """The four outcome shares per strategy (at its chosen rate) and prompt scenario, generation and
    likelihood, with the model before fine-tuning as the first rows; '' when no line has them."""
    chosen = [line for line in lines if line.get("chosen") and line.get("outcomes_by_scenario")]
    if not chosen:
        return ""
    names = {"correct": "correct", "other_language": "other language", "wrong_expected_language":
             "wrong, expected language", "other": "other"}  # fmt: skip
    header = (
        " | ".join(f"gen. {names[o]}" for o in OUTCOMES)
        + " | "
        + " | ".join(
            f"lik. {names[o]}"
            for o in OUTCOMES
            if o != "other"  # the ranking always picks a candidate
        )
    )
    out = [
        "Outcome shares per scenario (test items, mean over languages; mean over seeds at the chosen "
        "rate — ± sd where the strategy ran several seeds): generation = greedy answers, lik. = likelihood "
        "ranking.",
        "",
        f"| strategy | lr | scenario | {header} |",
        "|---|---|---|" + "---|" * (2 * len(OUTCOMES) - 1),
    ]

    def cell(value) -> str:
        if isinstance(value, (list, tuple)):
            return f"{value[0]:.3f} ± {value[1]:.3f}" if value[1] else f"{value[0]:.3f}"
        return f"{value:.3f}"

    def row(name: str, lr: str, scenario: str, shares: dict) -> str:
        gen = [cell(shares["generation"][o]) for o in OUTCOMES]
        lik = [cell(shares["likelihood"][o]) for o in OUTCOMES if o != "other"]
        return f"| {name} | {lr} | {scenario} | " + " | ".join(gen + lik) + " |"

    before = chosen[0]["outcomes_before_by_scenario"] or {}
    out += [row("before fine-tuning", "", scenario, shares) for scenario, shares in before.items()]
    for line in chosen:
        lr = "default" if line.get("lr") is None else f"{line['lr']:g}"
        out += [row(line["variant"], lr, s, shares) for s, shares in line["outcomes_by_scenario"].items()]
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
    run = RunDir.open(
        config.run_dir,
        config,
        may_change=("scenarios", "variants", "seeds", "lrs", "sweep_seeds", "finished_only"),
        save=not config.finished_only,  # a look at a running sweep leaves its directory as it was
    )
    rows = run_all(config)
    pending = [r for r in rows if r.get("pending")]
    rows = [r for r in rows if not r.get("pending")]
    lines = table(rows)
    atomic_write_json(
        run.path / "comparison.json",
        {"config": dataclasses.asdict(config), "runs": rows, "table": lines, "pending": pending},
    )
    text = markdown(lines)
    if outcomes := outcome_markdown(lines):
        text += "\n" + outcomes
    if pending:  # a partial table must say so where it is read
        text = (
            f"**Partial: the sweep is still running** ({len(pending)} runs known to be pending; the other "
            "seeds of a strategy whose rate is not chosen yet are not counted).\n\n" + text
        )
    atomic_write_text(run.path / "comparison.md", text)
    if lines:  # nothing finished yet: nothing to draw
        plot(lines, run.path / "comparison.png")
    return lines
