"""FVU vs L0 for a cross-layer transcoder and a per-layer transcoder with the same number of features,
over a range of sparsity coefficients λ. Writes a Markdown table and a plot.

    python benchmarks/sweep_clt_plt.py --model-dir runs/tiny-en-heavy/model \
        --store runs/activations/tiny-en-heavy.zarr --lambdas 0.3,1,3 --steps 600 --out docs/clt_vs_plt

Every run is an ordinary `train_clt` run directory under `--runs` (resumable, inspectable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clt.train import CLTTrainConfig, train_clt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--lambdas", default="0.3,1,3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument("--runs", default="runs/sweep-clt-plt")
    parser.add_argument("--out", default="docs/clt_vs_plt")
    args = parser.parse_args()

    rows = []
    for kind in ("clt", "plt"):
        for lam in [float(v) for v in args.lambdas.split(",")]:
            config = CLTTrainConfig(
                run_dir=f"{args.runs}/{kind}-lambda{lam:g}",
                model_dir=args.model_dir,
                store=args.store,
                n_features=args.n_features,
                plt=kind == "plt",
                sparsity_coefficient=lam,
                max_steps=args.steps,
                log_every=50,
                ckpt_every=200,
            )
            report = train_clt(config)
            held, repl = report["heldout"]["all"], report["replacement"]["all"]
            rows.append(
                {
                    "kind": kind,
                    "lambda": lam,
                    "mean_fvu": held["mean_fvu"],
                    "fvu": held["fvu"],
                    "mean_l0": held["mean_l0"],
                    "kl": repl["kl"],
                    "delta_ce": repl["delta_ce"],
                    "top1": repl["top1_agreement"],
                    "dead": sum(report["dead_fraction_per_layer"]) / len(report["dead_fraction_per_layer"]),
                    "never_active": sum(held["never_active_fraction"]) / len(held["never_active_fraction"]),
                    "steps": report["steps"],
                }
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("clt", "o"), ("plt", "s")):
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
        "| kind | λ | mean L0/layer | mean FVU | FVU per layer | KL | ΔCE | top-1 agree | dead (train) | never active (held-out) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind'].upper()} | {r['lambda']:g} | {r['mean_l0']:.1f} | {r['mean_fvu']:.4f} | "
            f"{', '.join(f'{v:.3f}' for v in r['fvu'])} | {r['kl']:.3f} | {r['delta_ce']:+.3f} | {r['top1']:.3f} | "
            f"{r['dead']:.3f} | {r['never_active']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
