"""A grid of transcoders on one activation store: kind (cross-layer or per-layer) × width × sparsity λ ×
pre-activation coefficient μ, everything else fixed. Writes a Markdown table, JSON rows and a plot of
FVU and replacement KL against L0.

    # which λ and width bring the replacement KL of a base model's CLT to ≤ 0.05 (docs/clt.md)
    python benchmarks/sweep_clt.py --clt-model-dir runs/base/balanced/pretrain/model \
        --clt-store runs/base/balanced/activations.zarr --clt-corpus-dir <corpus> \
        --lambdas 0.3,0.1 --widths 2048 --clt-train-tokens 1500000 --run-dir runs/sweep-clt-base-balanced
    # never-active features against μ; cross-layer vs per-layer transcoders (docs/clt.md)
    python benchmarks/sweep_clt.py ... --preacts 3e-6,3e-4,3e-3,3e-2 --widths 512 --clt-max-steps 600
    python benchmarks/sweep_clt.py ... --kinds clt,per-layer --lambdas 0.3,1,3 --widths 512 \
        --clt-max-steps 600

`--clt-*` sets every other transcoder option exactly as the same flag without `clt-` does for
`scripts/train_clt.py` (`--help` lists them).

Every transcoder is an ordinary, resumable `train_clt` run directory under `--run-dir`, named after its
cell (e.g. `clt-w2048-lam0.3-mu0.003`), so a killed sweep resumes and a cell added later reuses the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from clt.evaluate import summary_row
from clt.train import CLTTrainConfig, train_clt
from training.config import RunDir, atomic_write_json, atomic_write_text, parse_config, run_main
from training.errors import UserError

KINDS = ("clt", "per-layer")


def _clt_defaults() -> CLTTrainConfig:
    return CLTTrainConfig(log_every=50, ckpt_every=200)


@dataclass
class CLTSweepConfig:
    """Held-out FVU, L0, never-active features and replacement KL over a grid of transcoder settings."""

    kinds: list[str] = field(default_factory=lambda: ["clt"], metadata={"help": "clt and/or per-layer"})
    widths: list[int] = field(default_factory=lambda: [512], metadata={"help": "features per layer"})
    lambdas: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "sparsity coefficients λ"})
    preacts: list[float] = field(
        default_factory=lambda: [3e-3], metadata={"help": "pre-activation coefficients μ"}
    )
    run_dir: str = field(default="runs/sweep-clt", metadata={"help": "run directory (one sub-run per cell)"})
    clt: CLTTrainConfig = field(
        default_factory=_clt_defaults,
        metadata={"prefix": "clt_", "help": "every other transcoder setting (model, store, budget, …)"},
    )


# The grid may grow (a cell added later reuses the finished ones); what each cell computes may not.
MAY_CHANGE = ("kinds", "widths", "lambdas", "preacts", "clt.device")


def cell_name(kind: str, width: int, lam: float, mu: float) -> str:
    return f"{kind}-w{width}-lam{lam:g}-mu{mu:g}"


def run_sweep(args: CLTSweepConfig) -> list[dict]:
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        raise UserError(f"unknown transcoder kinds {unknown}; choose from {', '.join(KINDS)}")
    base, given = _clt_defaults(), args.clt
    set_by_grid = {
        "--clt-run-dir": given.run_dir != base.run_dir,
        "--clt-n-features": given.clt.n_features != base.clt.n_features,
        "--clt-cross-layer": given.clt.cross_layer != base.clt.cross_layer,
        "--clt-preact-coefficient": given.preact_coefficient != base.preact_coefficient,
        "--clt-sparsity-coefficient": given.sparsity_coefficient != base.sparsity_coefficient,
    }
    for flag, is_set in set_by_grid.items():
        if is_set:
            raise UserError(f"{flag} is set by the grid; use --kinds/--widths/--lambdas/--preacts/--run-dir")
    run = RunDir.open(args.run_dir, args, may_change=MAY_CHANGE)
    rows = []
    for kind, width, lam, mu in itertools.product(args.kinds, args.widths, args.lambdas, args.preacts):
        config = dataclasses.replace(
            args.clt,
            run_dir=str(run.path / cell_name(kind, width, lam, mu)),
            clt=dataclasses.replace(args.clt.clt, n_features=width, cross_layer=kind == "clt"),
            sparsity_coefficient=lam,
            preact_coefficient=mu,
        )
        row = {"kind": kind, "width": width, "lambda": lam, "preact": mu}
        rows.append(row | summary_row(train_clt(config)))
    write_outputs(rows, run.path / "sweep")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| kind | width | λ | μ | mean L0/layer | mean FVU | FVU per layer | KL | max KL (language) | ΔCE "
        "| top-1 agree | never active per layer (held-out) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        worst = max(r["kl_per_language"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
        lines.append(
            f"| {r['kind'].upper()} | {r['width']} | {r['lambda']:g} | {r['preact']:g} | {r['mean_l0']:.1f} "
            f"| {r['mean_fvu']:.4f} | {', '.join(f'{v:.3f}' for v in r['fvu'])} | {r['kl']:.3f} "
            f"| {worst[1]:.3f} ({worst[0]}) | {r['delta_ce']:+.3f} | {r['top1']:.3f} "
            f"| {', '.join(f'{v:.2f}' for v in r['never_active_per_layer'])} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_json(out.with_suffix(".json"), rows)
    atomic_write_text(out.with_suffix(".md"), table(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["kind"], r["width"], r["preact"]) for r in rows})
    for kind, width, mu in series:
        points = sorted(
            (r["mean_l0"], r["mean_fvu"], r["kl"], r["lambda"])
            for r in rows
            if (r["kind"], r["width"], r["preact"]) == (kind, width, mu)
        )
        label = f"{kind.upper()} {width}/layer μ={mu:g}"
        for ax, metric in zip(axes, (1, 2)):
            ax.plot([p[0] for p in points], [p[metric] for p in points], marker="o", label=label)
            for p in points:
                ax.annotate(
                    f"λ={p[3]:g}", (p[0], p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    for ax, name in zip(axes, ("mean FVU over layers (held-out)", "replacement KL (nats/token)")):
        ax.set_xlabel("mean L0 per layer (held-out tokens)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    print(table(run_sweep(parse_config(CLTSweepConfig, argv))))


if __name__ == "__main__":
    run_main(main)
