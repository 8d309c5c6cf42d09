"""Markdown tables comparing pretraining runs (from their summary.json), for docs/.

python scripts/summarize_pretraining.py runs/tiny-en-heavy runs/tiny-balanced
"""

import json
import sys
from pathlib import Path


def main(run_dirs: list[str]) -> None:
    summaries = {Path(d).name: json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs}
    names = list(summaries)
    langs = sorted({lang for s in summaries.values() for lang in s["validation_loss"]})
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    rows = [
        ("parameters", lambda s: f"{s['parameters']:,}"),
        ("distinct tokens sampled", lambda s: f"{sum(s['tokens_per_language_sampled'].values()):,}"),
        ("tokens trained", lambda s: f"{s['tokens_trained']:,}"),
        ("steps", lambda s: f"{s['steps']:,}"),
        ("median tokens/s (training steps)", lambda s: f"{s['tokens_per_s_median']:,.0f}"),
        ("wall time (s)", lambda s: f"{s['wall_time_s']:,.0f}"),
    ]
    print("### Runs\n\n" + header)
    for label, fn in rows:
        print(f"| {label} | " + " | ".join(fn(summaries[n]) for n in names) + " |")
    print("\n### Tokens sampled per language\n\n" + header)
    for lang in langs:
        print(
            f"| {lang} | "
            + " | ".join(f"{summaries[n]['tokens_per_language_sampled'].get(lang, 0):,}" for n in names)
            + " |"
        )
    print("\n### Validation loss per language (nats/token; each model's own tokenizer)\n\n" + header)
    for lang in langs:
        print(
            f"| {lang} | " + " | ".join(f"{summaries[n]['validation_loss'][lang]:.3f}" for n in names) + " |"
        )
    print("\n### Tokenizer fertility on the validation split\n\n" + header)
    for lang in langs:
        cells = [summaries[n]["fertility_on_validation"][lang] for n in names]
        print(
            f"| {lang} ({cells[0]['fertility_unit']}) | "
            + " | ".join(f"{c['fertility']:.3f}" for c in cells)
            + " |"
        )
    for mode in ("greedy", "sampled"):
        print(
            f"\n### Language consistency of {mode} continuations (share in the prompt's language; unknown)\n\n"
            + header
        )
        for lang in langs:
            cells = [summaries[n]["language_consistency"][mode][lang] for n in names]
            print(
                f"| {lang} | "
                + " | ".join(f"{c['consistent']:.2f} ({c['unknown']:.2f}) n={c['n']}" for c in cells)
                + " |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
