"""A scaling sweep: which model shape reaches the lowest held-out loss within a wall-clock budget here.

Each shape is one warmup-stable-decay run as long as the largest budget. A shorter budget is read off a
decay branch (`PretrainConfig.branch_from`) forked from that run where the shorter run's decay would
start (Hägele et al. 2024): the stable phase is the same whatever the total, so the branch is exactly
the short run, and a shape costs its largest budget plus the decay phases of the shorter ones.

Budgets are minutes of the idle machine, turned into optimizer steps by a per-shape calibration (bare
training steps timed before any run starts): the runs may then share the machine with other work
without changing what they compute, and the sweep resumes after a kill. The score is held-out
nats per character (tokenizer-independent) on every language of the mixture.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.config import RunDir, atomic_write_json
from training.corpus.build import default_corpus_dir, load_corpus
from training.errors import UserError
from training.loop import wsd_decay_start
from training.mixtures import parse_mixture
from training.pretrain import (
    PretrainConfig,
    model_config_for,
    pretrain,
    saved_mixture_tokenizer,
    time_bare_steps,
)

# Shape and budget fields fix what a read means; the rest may not change under a resumed sweep either,
# except adding shapes or budgets (new runs) and the device.
MAY_CHANGE = ("device", "shapes", "minutes", "max_minutes")


@dataclass
class SweepConfig:
    """Scaling sweep: held-out nats/char of several model shapes at several 2-core wall-clock budgets."""

    run_dir: str = field(default="runs/scaling-sweep", metadata={"help": "sweep directory"})
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()),
        metadata={"help": "corpus (default: the built one)"},
    )
    shapes: list[str] = field(
        default_factory=lambda: ["4x128", "6x256", "6x384"], metadata={"help": "shapes as LAYERSxWIDTH"}
    )
    minutes: list[float] = field(
        default_factory=lambda: [15, 30, 60], metadata={"help": "budgets in minutes of the idle machine"}
    )
    max_minutes: list[str] = field(
        default_factory=list,
        metadata={
            "help": "per-shape caps SHAPE=MINUTES (e.g. 6x384=30): that shape is read only at budgets up to "
            "the cap, its main run ending there — keeps a large shape within the sweep's CPU budget"
        },
    )
    head_dim: int = field(default=64, metadata={"help": "attention head width (heads = width / head_dim)"})
    mixture: str = field(default="balanced", metadata={"help": "language mixture"})
    vocab_size: int = field(default=16384, metadata={"help": "BPE vocabulary, one tokenizer for all shapes"})
    tokenizer_chars: int = field(default=12_000_000, metadata={"help": "characters to train the tokenizer"})
    token_budget: int = field(default=12_000_000, metadata={"help": "distinct training tokens sampled"})
    n_ctx: int = field(default=256, metadata={"help": "context length (all shapes)"})
    micro_batch: int = field(default=16, metadata={"help": "blocks per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (of a shape --lr-width wide)"})
    lr_width: int = field(
        default=0,
        metadata={
            "help": "if > 0, a shape of width w trains at lr × lr_width / w (Adam's update to a hidden "
            "matrix grows with its fan-in: the muP rule); 0 = the same lr for every shape"
        },
    )
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps"})
    decay_fraction: float = field(default=0.2, metadata={"help": "share of each budget spent decaying"})
    calibration_steps: int = field(default=20, metadata={"help": "timed bare steps per shape"})
    eval_every: int = field(default=500, metadata={"help": "steps between validation losses"})
    ckpt_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    gen_prompts: int = field(default=20, metadata={"help": "prompts per language for the consistency eval"})
    seed: int = field(default=0, metadata={"help": "seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})


def parse_shape(shape: str) -> tuple[int, int]:
    layers, sep, width = shape.lower().partition("x")
    if not sep or not layers.isdigit() or not width.isdigit():
        raise UserError(f"shape {shape!r} is not LAYERSxWIDTH (e.g. 6x256)")
    return int(layers), int(width)


def shape_minutes(config: SweepConfig, shape: str) -> list[float]:
    """The budgets `shape` is read at: every --minutes up to its --max-minutes cap."""
    caps = {}
    for item in config.max_minutes:
        name, sep, cap = item.partition("=")
        if not sep or name not in config.shapes:
            raise UserError(f"--max-minutes {item!r} is not SHAPE=MINUTES for one of {config.shapes}")
        caps[name] = float(cap)
    budgets = sorted(m for m in config.minutes if m <= caps.get(shape, float("inf")))
    if not budgets:
        raise UserError(f"--max-minutes leaves no budget for {shape}")
    return budgets


def pretrain_config(config: SweepConfig, shape: str, minutes: float, steps: int) -> PretrainConfig:
    """The WSD pretraining run of `shape` that is read at `minutes` (`steps` optimizer steps)."""
    layers, width = parse_shape(shape)
    if width % config.head_dim:
        raise UserError(f"shape {shape}: width {width} is not a multiple of --head-dim {config.head_dim}")
    return PretrainConfig(
        run_dir=str(Path(config.run_dir) / shape / f"{minutes:g}min"),
        corpus_dir=config.corpus_dir,
        mixture=config.mixture,
        token_budget=config.token_budget,
        max_steps=steps,
        tokenizer_dir=str(Path(config.run_dir) / "tokenizer"),
        vocab_size=config.vocab_size,
        n_layer=layers,
        n_embd=width,
        n_head=width // config.head_dim,
        n_ctx=config.n_ctx,
        micro_batch=config.micro_batch,
        lr=config.lr * (config.lr_width / width if config.lr_width else 1.0),
        schedule="wsd",
        decay_fraction=config.decay_fraction,
        warmup_steps=config.warmup_steps,
        eval_every=config.eval_every,
        ckpt_every=config.ckpt_every,
        gen_prompts=config.gen_prompts,
        seed=config.seed,
        device=config.device,
    )


def calibrate(config: PretrainConfig, vocab_size: int, steps: int = 20) -> float:
    """Optimizer steps per second of `config`'s model shape and batch: bare steps on random blocks, after
    3 untimed ones, on the machine as it is now (run it before loading the machine with other work)."""
    model_config = model_config_for(config, vocab_size, 1, 1)
    n_ctx = model_config.n_positions
    blocks = torch.randint(0, vocab_size, (4 * config.micro_batch, n_ctx), generator=torch.Generator())
    return steps / time_bare_steps(model_config, blocks, config, steps, warmup=3)


def read(summary: dict, mixture: dict[str, float]) -> dict:
    """The numbers a read keeps from a finished run's summary."""
    nats = {lang: summary["validation_nats_per_char"][lang] for lang in sorted(mixture)}
    return {
        "steps": summary["steps"],
        "tokens": summary["tokens_trained"],
        "parameters": summary["parameters"],
        "train_time_s": summary["train_time_s"],
        "tokens_per_s_median": summary["tokens_per_s_median"],
        "nats_per_char": nats,
        "mean_nats_per_char": sum(nats.values()) / len(nats),
        "nats_per_char_outside_mixture": {
            lang: value for lang, value in summary["validation_nats_per_char"].items() if lang not in mixture
        },
        "consistency_sampled": {
            lang: summary["language_consistency"]["sampled"][lang]["consistent"] for lang in sorted(mixture)
        },
    }


def run_sweep(config: SweepConfig) -> dict:
    run = RunDir.open(config.run_dir, config, may_change=MAY_CHANGE)
    mixture = parse_mixture(config.mixture)
    corpus = load_corpus(config.corpus_dir)
    tokenizer_dir = saved_mixture_tokenizer(
        Path(config.run_dir) / "tokenizer", corpus, config.mixture, config.tokenizer_chars,
        config.vocab_size, config.seed,
    )  # fmt: skip
    vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])

    # Calibrate every shape first, on the machine before the sweep loads it.
    calibrations = run.keyed(("calibration",))
    for shape in config.shapes:
        if (shape,) not in calibrations:
            steps_per_s = calibrate(
                pretrain_config(config, shape, 0, 1), vocab_size, config.calibration_steps
            )
            record = {"calibration": shape, "steps_per_s": steps_per_s, "threads": torch.get_num_threads()}
            record["tokens_per_s"] = steps_per_s * config.micro_batch * config.n_ctx
            run.log_metrics(record)
            calibrations[(shape,)] = record
            print(f"calibration {shape}: {record['tokens_per_s']:,.0f} tokens/s")

    reads = run.keyed(("shape", "minutes"))
    shared_data = None
    for shape in config.shapes:
        minutes = shape_minutes(config, shape)
        steps_per_s = calibrations[(shape,)]["steps_per_s"]
        steps = {m: max(1, round(m * 60 * steps_per_s)) for m in minutes}
        main = pretrain_config(config, shape, minutes[-1], steps[minutes[-1]])
        # Every shape samples and packs the same data (same tokenizer, mixture, budget, n_ctx, seed).
        if shared_data is not None and not Path(main.run_dir, "data", "meta.json").exists():
            shutil.copytree(shared_data, Path(main.run_dir, "data"), dirs_exist_ok=True)
        for budget in minutes[:-1]:
            if (shape, budget) in reads:
                continue
            branch = pretrain_config(config, shape, budget, steps[budget])
            fork = wsd_decay_start(steps[budget], main)
            if fork > 0:  # (a branch forking at step 0 is simply the short run from scratch)
                if not Path(branch.run_dir, "checkpoint").exists():
                    pretrain(dataclasses.replace(main, pause_at_step=fork))
                branch = dataclasses.replace(branch, branch_from=main.run_dir)
            reads[(shape, budget)] = log_read(run, shape, budget, pretrain(branch), mixture)
        if (shape, minutes[-1]) not in reads:
            reads[(shape, minutes[-1])] = log_read(run, shape, minutes[-1], pretrain(main), mixture)
        shared_data = Path(main.run_dir, "data")

    results = summarize(config, calibrations, reads)
    atomic_write_json(Path(config.run_dir) / "results.json", results)
    write_report(config, results, Path(config.run_dir))
    return results


def log_read(run: RunDir, shape: str, minutes: float, summary: dict, mixture: dict[str, float]) -> dict:
    record = {"shape": shape, "minutes": minutes, **read(summary, mixture)}
    run.log_metrics(record)
    print(f"{shape} at {minutes} min: {record['mean_nats_per_char']:.4f} nats/char")
    return record


def summarize(config: SweepConfig, calibrations: dict, reads: dict) -> dict:
    rows = [reads[(s, m)] for s in config.shapes for m in shape_minutes(config, s) if (s, m) in reads]
    best = {}
    for m in sorted(config.minutes):
        at_budget = [r for r in rows if r["minutes"] == m]
        if at_budget:
            best[m] = min(at_budget, key=lambda r: r["mean_nats_per_char"])["shape"]
    # What the sweep cost: every run's training steps (the shared stable phase counted once) at the
    # calibrated speed, i.e. idle-machine minutes, plus what the decay branches add.
    cost_min = 0.0
    for shape in config.shapes:
        steps_per_s = calibrations[(shape,)]["steps_per_s"]
        minutes = shape_minutes(config, shape)
        total = round(minutes[-1] * 60 * steps_per_s)
        branches = sum(round(m * 60 * steps_per_s) * config.decay_fraction for m in minutes[:-1])
        cost_min += (total + branches) / steps_per_s / 60
    return {
        "calibration": {shape: calibrations[(shape,)] for shape in config.shapes},
        "reads": rows,
        "best_shape_per_budget": best,
        "sweep_cost_idle_machine_hours": cost_min / 60,
    }


def write_report(config: SweepConfig, results: dict, path: Path) -> None:
    from training.plots import plot_scaling

    plot_scaling(results["reads"], path / "scaling.png", title=f"{config.mixture} mixture")
    langs = sorted(parse_mixture(config.mixture))
    lines = [
        "| shape | params | min | steps | tokens | mean nats/char | "
        + " | ".join(langs)
        + " | consistency (sampled) |",
        "|---" * (6 + len(langs) + 1) + "|",
    ]
    for r in results["reads"]:
        consistency = sum(r["consistency_sampled"].values()) / len(r["consistency_sampled"])
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e6:.1f}M | {r['minutes']} | {r['steps']:,} | "
            f"{r['tokens'] / 1e6:.1f}M | **{r['mean_nats_per_char']:.4f}** | "
            + " | ".join(f"{r['nats_per_char'][lang]:.3f}" for lang in langs)
            + f" | {consistency:.2f} |"
        )
    calibration = [
        f"| {shape} | {c['tokens_per_s']:,.0f} | {c['steps_per_s']:.2f} |"
        for shape, c in results["calibration"].items()
    ]
    best = ", ".join(f"{m} min: {shape}" for m, shape in results["best_shape_per_budget"].items())
    text = "\n".join(
        [
            "# Scaling sweep",
            "",
            f"Reads ({config.mixture}, held-out nats per character, lower is better):",
            "",
            *lines,
            "",
            "Calibrated throughput (idle machine, bare steps):",
            "",
            "| shape | tokens/s | steps/s |",
            "|---|---|---|",
            *calibration,
            "",
            f"Best shape per budget: {best}.",
            f"Sweep cost: {results['sweep_cost_idle_machine_hours']:.2f} idle-machine hours.",
            "",
        ]
    )
    (path / "report.md").write_text(text)
