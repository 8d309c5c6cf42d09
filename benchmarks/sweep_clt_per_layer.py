"""FVU vs L0 for a cross-layer transcoder and a per-layer transcoder with the same number of features,
over a range of sparsity coefficients λ. Writes a Markdown table and a plot.

    python benchmarks/sweep_clt_per_layer.py --model-dir runs/pretrain-tiny-en-heavy/model \
        --store runs/activations/tiny-en-heavy.zarr --lambdas 0.3,1,3 --steps 600 --run-dir
        runs/sweep-clt-per-layer
    cp runs/sweep-clt-per-layer/clt_vs_per_layer.{json,md,png} docs/   # docs/clt_vs_plt.* hold the last run

Every transcoder is an ordinary `train_clt` run directory under `--run-dir` (resumable, inspectable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clt.evaluate import summary_row
from clt.train import CLTTrainConfig, train_clt
from training import paths
from training.config import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    config_from_dict,
    parse_config,
    run_main,
)


@dataclass
class SweepConfig:
    """FVU vs L0 of cross-layer and per-layer transcoders over sparsity coefficients."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    store: str = field(default=paths.STORE, metadata={"help": "activation store of that model"})
    lambdas: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0], metadata={"help": "sparsity coefficients"}
    )
    steps: int = field(default=600, metadata={"help": "training steps per transcoder"})
    n_features: int = field(default=512, metadata={"help": "features per layer"})
    run_dir: str = field(
        default="runs/sweep-clt-per-layer", metadata={"help": "run directory (one sub-run per transcoder)"}
    )


def main(argv: list[str]) -> None:
    args = parse_config(SweepConfig, argv)
    run = RunDir.open(args.run_dir, args, may_change=("lambdas",))

    rows = []
    for kind in ("clt", "per-layer"):
        for lam in args.lambdas:
            config = config_from_dict(
                CLTTrainConfig,
                {
                    "run_dir": str(run.path / f"{kind}-lambda{lam:g}"),
                    "model_dir": args.model_dir,
                    "store": args.store,
                    "n_features": args.n_features,
                    "cross_layer": kind == "clt",
                    "sparsity_coefficient": lam,
                    "max_steps": args.steps,
                    "log_every": 50,
                    "ckpt_every": 200,
                },
            )
            rows.append({"kind": kind, "lambda": lam, **summary_row(train_clt(config))})
    out = run.path / "clt_vs_per_layer"
    atomic_write_json(out.with_suffix(".json"), rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("clt", "o"), ("per-layer", "s")):
        points = sorted((r["mean_l0"], r["mean_fvu"], r["lambda"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=kind.upper())
        for l0, fvu, lam in points:
            ax.annotate(f"λ={lam:g}", (l0, fvu), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean L0 per layer (held-out tokens)")
    ax.set_ylabel("mean FVU over layers (held-out)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{args.n_features} features per layer, {args.steps} steps")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)

    lines = [
        "| kind | λ | mean L0/layer | mean FVU | FVU per layer | KL | ΔCE | top-1 agree | dead (train) "
        "| never active (held-out) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind'].upper()} | {r['lambda']:g} | {r['mean_l0']:.1f} | {r['mean_fvu']:.4f} | "
            f"{', '.join(f'{v:.3f}' for v in r['fvu'])} | {r['kl']:.3f} | {r['delta_ce']:+.3f} | "
            f"{r['top1']:.3f} | "
            f"{r['dead']:.3f} | {r['never_active']:.3f} |"
        )
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
