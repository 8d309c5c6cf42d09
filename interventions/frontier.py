"""Steering methods compared at equal fluency cost (issue #13; docs/methods.md §8).

Each (pair, method, decoding) has a path of evaluated strengths, starting at the unsteered model
(strength "none": Δ loss 0). Along it, Δ loss = the unsteered model's loss on the steered continuation
minus its loss on its own continuation (nats/token), and success = non-degenerate swap success. A
method's **success at budget B** is the best success on that path with Δ loss ≤ B, where the path
between two evaluated strengths is the straight line (so a budget crossed between strengths s and s'
gets the linearly interpolated success, and its interval the interpolated Wilson bounds). Averages over
pairs carry a bootstrap interval over pairs (pairs are the units; 2,000 resamples, seeded).
"""

from __future__ import annotations

import random


def success_at_budget(
    points: list[tuple[float, float, float, float]], budget: float
) -> tuple[float, float, float]:
    """points: (Δ loss, success, CI low, CI high) in strength order, the unsteered model first.
    Returns (success, low, high) of the best point reachable within the budget."""
    if not points:
        raise ValueError("no points on the path")
    best = None
    for point in points:
        if point[0] <= budget and (best is None or point[1] > best[0]):
            best = point[1:]
    for a, b in zip(points, points[1:]):
        if (a[0] - budget) * (b[0] - budget) < 0:  # the budget is crossed between a and b
            t = (budget - a[0]) / (b[0] - a[0])
            crossing = tuple(a[i] + t * (b[i] - a[i]) for i in (1, 2, 3))
            if best is None or crossing[0] > best[0]:
                best = crossing
    return best if best is not None else (float("nan"),) * 3


def bootstrap_mean(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95% percentile-bootstrap interval."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return sum(values) / len(values), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _value(record: dict, key: str) -> tuple[float, float, float]:
    """A record's metric with its interval; a metric recorded without one (first-token shares) is its
    own interval."""
    value = record[key]
    return (value, *record[f"{key}_ci"]) if f"{key}_ci" in record else (value, value, value)


def path(
    records: list[dict], baseline: dict, key: str = "fluent_success"
) -> list[tuple[float, float, float, float]]:
    """A method's (Δ loss, metric, low, high) path in strength order, from the unsteered baseline;
    the metric is non-degenerate swap success unless `key` names another record field."""
    start = (0.0, *_value(baseline, key))
    rest = [
        (r["continuation_loss"] - baseline["continuation_loss"], *_value(r, key))
        for r in sorted(records, key=lambda r: r["strength"])
    ]
    return [start] + rest


def frontier(
    records: list[dict],
    pairs: list[tuple[str, str]],
    methods: list[str],
    budgets: list[float],
    key: str = "fluent_success",
) -> dict:
    """Per decoding: per-pair success (or the record field `key`) at each budget, the mean over pairs
    with its interval, and the issue's goal check for every feature strategy that has a random control."""
    out = {}
    for decoding in sorted({r["decoding"] for r in records}):
        rows = [r for r in records if r["decoding"] == decoding]
        baselines = {(r["source"], r["target"]): r for r in rows if r["method"] == "none"}
        per_pair, means = {}, {}
        for source, target in pairs:
            baseline = baselines.get((source, target))
            if baseline is None:
                continue
            cell = {"none": {str(b): baseline[key] for b in budgets}}
            for method in methods:
                mine = [
                    r for r in rows if (r["source"], r["target"], r["method"]) == (source, target, method)
                ]
                if mine:
                    points = path(mine, baseline, key)
                    cell[method] = {str(b): success_at_budget(points, b) for b in budgets}
            per_pair[f"{source}->{target}"] = cell
        for method in ["none"] + methods:
            means[method] = {}
            for b in budgets:
                values = [
                    (cell[method][str(b)] if method == "none" else cell[method][str(b)][0])
                    for cell in per_pair.values()
                    if method in cell
                ]
                if values:
                    means[method][str(b)] = {"n_pairs": len(values), "mean_ci": bootstrap_mean(values)}
        out[decoding] = {"per_pair": per_pair, "mean": means, "goal": goal_check(means, methods, budgets)}
    return out


def goal_check(means: dict, methods: list[str], budgets: list[float], budget: float = 1.0) -> dict:
    """At Δ loss ≤ 1: each strategy's mean success as a share of difference-of-means', and its gain over
    the unsteered rate divided by its random control's gain (the issue's targets: ≥ 0.8 and ≥ 3)."""
    key = str(budget)
    if key not in {str(b) for b in budgets} or not means.get("none", {}).get(key):
        return {}
    base = means["none"][key]["mean_ci"][0]
    diffmean = means.get("diffmean", {}).get(key, {}).get("mean_ci", [None])[0]
    result = {}
    for method in methods:
        control = f"random-{method}"
        if control not in means or not means.get(method, {}).get(key):
            continue
        mine = means[method][key]["mean_ci"][0]
        random_gain = means[control][key]["mean_ci"][0] - base if means[control].get(key) else None
        result[method] = {
            "success": mine,
            "share_of_diffmean": mine / diffmean if diffmean else None,
            "gain_over_unsteered": mine - base,
            "random_control_gain": random_gain,
            "gain_ratio_vs_random": (mine - base) / random_gain if random_gain and random_gain > 0 else None,
        }
    return result


# The first-token shares (interventions/steering.py: evaluate) of records that carry them.
OPTIONAL_KEYS = ("first_token_target", "first_token_source")


def dose_table(records: list[dict], methods: list[str]) -> dict:
    """Per decoding, method and strength: means over pairs of every recorded quantity, Δ loss included."""
    baselines = {(r["source"], r["target"], r["decoding"]): r for r in records if r["method"] == "none"}
    table: dict = {}
    keys = ("success", "fluent_success", "distinct", "retention", "unknown", "prompt_kl")
    for decoding in sorted({r["decoding"] for r in records}):
        for method in methods:
            mine = [r for r in records if r["method"] == method and r["decoding"] == decoding]
            for strength in sorted({r["strength"] for r in mine}):
                rows = [r for r in mine if r["strength"] == strength]
                deltas = [
                    r["continuation_loss"]
                    - baselines[(r["source"], r["target"], decoding)]["continuation_loss"]
                    for r in rows
                    if (r["source"], r["target"], decoding) in baselines
                ]
                entry = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
                for k in OPTIONAL_KEYS:  # recorded since a later version: only where every pair has it
                    if all(k in r for r in rows):
                        entry[k] = sum(r[k] for r in rows) / len(rows)
                entry.update(
                    strength=strength, n_pairs=len(rows), delta_loss=sum(deltas) / max(1, len(deltas))
                )
                table.setdefault(decoding, {}).setdefault(method, []).append(entry)
    return table


def mean_table(means: dict, budgets: list[float]) -> list[str]:
    """Markdown rows: per method, the mean over pairs [bootstrap interval] at each budget."""
    lines = [
        "| method | " + " | ".join(f"Δ loss ≤ {b:g}" for b in budgets) + " | pairs |",
        "|---|" + "---|" * (len(budgets) + 1),
    ]
    for method, by_budget in means.items():
        cells, n = [], 0
        for b in budgets:
            entry = by_budget.get(str(b))
            if entry is None:
                cells.append("—")
                continue
            mean, low, high = entry["mean_ci"]
            n = entry["n_pairs"]
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return lines


def frontier_markdown(summary: dict, budgets: list[float]) -> str:
    lines = []
    for decoding, result in summary["frontier"].items():
        methods = list(result["mean"])
        lines += [
            f"### {decoding} decoding: non-degenerate swap success at a fluency budget",
            "",
            "Mean over pairs [95% bootstrap interval over pairs] of the best success reachable with Δ loss "
            "(unsteered model's nats/token on the continuation, vs its own) at most the budget:",
            "",
            *mean_table(result["mean"], budgets),
        ]
        first = summary.get("first_token_frontier", {}).get(decoding)
        if first:
            lines += [
                "",
                "The same budgets, judged as seed 003 judged (its 1–2 generated tokens): share of "
                "continuations whose *first* generated token is the target language's (p(lang | token) "
                "> 0.5, validation-split counts) — degenerate or not:",
                "",
                *mean_table(first["mean"], budgets),
            ]
        if result["goal"]:
            lines += [
                "",
                "Goal check at Δ loss ≤ 1 (targets: ≥ 0.8 of diffmean; ≥ 3× the random control's gain):",
                "",
            ]
            for method, g in result["goal"].items():
                share = "—" if g["share_of_diffmean"] is None else f"{g['share_of_diffmean']:.2f}"
                ratio = "—" if g["gain_ratio_vs_random"] is None else f"{g['gain_ratio_vs_random']:.2f}"
                lines.append(
                    f"- {method}: success {g['success']:.3f}, {share} of diffmean, gain "
                    f"{g['gain_over_unsteered']:+.3f} vs random control's {g['random_control_gain']:+.3f} "
                    f"(ratio {ratio})"
                )
        lines += ["", f"Per pair at Δ loss ≤ {budgets[-1]:g} (success [Wilson bounds interpolated]):", ""]
        pair_methods = [m for m in methods if m != "none"]
        lines += [
            "| pair | none | " + " | ".join(pair_methods) + " |",
            "|---|---|" + "---|" * len(pair_methods),
        ]
        key = str(budgets[-1])
        for pair, cell in result["per_pair"].items():
            row = [f"{cell['none'][key]:.2f}"]
            for method in pair_methods:
                value = cell.get(method, {}).get(key)
                row.append("—" if value is None else f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]")
            lines.append(f"| {pair} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_frontier(dose: dict, budgets: list[float], path) -> None:
    """Success vs Δ loss per method (means over pairs, in strength order), one panel per decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decodings = list(dose)
    fig, axes = plt.subplots(
        1, max(1, len(decodings)), figsize=(6 * max(1, len(decodings)), 4.5), squeeze=False
    )
    for ax, decoding in zip(axes[0], decodings):
        for method, entries in dose[decoding].items():
            ax.plot(
                [e["delta_loss"] for e in entries],
                [e["fluent_success"] for e in entries],
                "-o",
                markersize=3,
                label=method,
            )
        for b in budgets:
            ax.axvline(b, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("Δ loss of the unsteered model on the continuation (nats/token)")
        ax.set_ylabel("non-degenerate swap success (mean over pairs)")
        ax.set_title(f"{decoding} decoding", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def span_diagnostics(units, clt, pairs: list[tuple[str, str]], strategies: list[str], seed: int = 0) -> dict:
    """Why feature steering does or does not reach difference-of-means (issue #13, diagnostic a/b):
    per layer k, the share of each pair's difference-of-means direction (mean residual on target text
    − on source text, after layer k) inside the span of the strategy's selected features (source and
    target sets) and of its random control's, and how much of it the oracle's ≤ k non-negative
    features rebuild (1 − ‖residual‖² / ‖d‖²). Means over pairs."""
    import torch

    from analysis.feature_selection import cumulative_writes, oracle_features, span_share
    from interventions.steering import random_matched_features

    n_layers = next(iter(units.residual_means.values())).shape[0]
    writes = cumulative_writes(clt)
    out: dict = {}
    for strategy in strategies:
        sets = units.feature_sets.get(strategy)
        if sets is None:
            continue
        exclude = {u for s in units.feature_sets.values() for items in s.values() for u in items}
        rows = {"features": [], "random": []}
        for layer in range(n_layers):
            shares, random_shares = [], []
            for source, target in pairs:
                d = units.residual_means[target][layer] - units.residual_means[source][layer]
                chosen = list(sets.get(source, [])) + list(sets.get(target, []))
                shares.append(span_share(clt, chosen, d, layer))
                random_shares.append(
                    span_share(clt, random_matched_features(clt, chosen, exclude, seed), d, layer)
                )
            rows["features"].append(sum(shares) / len(shares))
            rows["random"].append(sum(random_shares) / len(random_shares))
        out[strategy] = rows
    oracle = []
    for layer in range(n_layers):
        rebuilt = []
        for source, target in pairs:
            d = units.residual_means[target][layer] - units.residual_means[source][layer]
            features, weights = oracle_features(clt, d, layer, units.oracle_k)
            fit = sum((w * writes[l][f, layer] for (l, f), w in zip(features, weights)), torch.zeros_like(d))
            rebuilt.append(float(1 - (d - fit).norm() ** 2 / d.norm().clamp(min=1e-12) ** 2))
        oracle.append(sum(rebuilt) / len(rebuilt))
    out["oracle_fit"] = oracle
    return out


def span_markdown(diagnostics: dict, oracle_k: int) -> str:
    n_layers = len(diagnostics["oracle_fit"])
    lines = [
        "Share of the difference-of-means direction (per layer, mean over pairs) in the span of each "
        "strategy's source + target features (random control in brackets), and the share the oracle's "
        f"≤ {oracle_k} non-negative features rebuild:",
        "",
        "| strategy | " + " | ".join(f"layer {k}" for k in range(n_layers)) + " |",
        "|---|" + "---|" * n_layers,
    ]
    for strategy, rows in diagnostics.items():
        if strategy == "oracle_fit":
            continue
        cells = [f"{a:.2f} ({b:.2f})" for a, b in zip(rows["features"], rows["random"])]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines.append("| oracle fit | " + " | ".join(f"{v:.2f}" for v in diagnostics["oracle_fit"]) + " |")
    return "\n".join(lines) + "\n"
