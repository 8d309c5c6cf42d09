"""The "which layers and units speak which language" report: findings computed from the section
results, written as JSON (every number), Markdown and a self-contained HTML page (plots inline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.render import Report


def findings(sections: dict) -> list[dict]:
    """The seed papers' claims, each with the number behind it (only for the sections that were run)."""
    out = []
    lens = sections.get("lens")
    if lens:
        n_layers = lens["n_layers"]
        leads = {lang: e["own_language_leads_from_layer"] for lang, e in lens["by_prompt_lang"].items()}
        middle = n_layers // 2
        detail = {
            lang: {
                "leads_from_layer": leads[lang],
                "p_own_middle": e["soft"][lang][middle],
                "p_own_last": e["soft"][lang][-1],
                "leader_middle": e["leader_per_layer"][middle],
            }
            for lang, e in lens["by_prompt_lang"].items()
        }
        late = [lang for lang, layer in leads.items() if layer is not None and layer >= n_layers - 2]
        out.append(
            {
                "claim": "the prompt's language wins only in the last layers (logit lens)",
                "measure": "first layer from which the soft lens's top language is the prompt's own, "
                f"of {n_layers} layers",
                "detail": detail,
                "verdict": f"{len(late)}/{len(leads)} languages lead only from layer ≥ {n_layers - 2}; "
                "never lead: "
                f"{[l for l, v in leads.items() if v is None]}",
            }
        )
    sim = sections.get("similarity")
    if sim:
        gap = sim["mean"]["centred"]["gap"]
        peak = sim["centred_gap_peak_layer"]
        out.append(
            {
                "claim": "parallel − non-parallel similarity peaks in the middle layers",
                "measure": "centred cosine gap per layer (mean over language pairs)",
                "detail": {"centred_gap": gap, "raw_gap": sim["mean"]["raw"]["gap"], "peak_layer": peak},
                "verdict": f"peak at layer {peak} of {len(gap)} "
                f"({'middle' if 0 < peak < len(gap) - 1 else 'edge'})",
            }
        )
    lape = sections.get("lape")
    if lape:
        for name, selection in lape["selections"].items():
            counts = np.array(selection["selected_per_layer"])
            edge = (counts[0] + counts[-1]) / max(counts.sum(), 1)
            out.append(
                {
                    "claim": f"LAPE neurons ({name}) concentrate in the first and last layers",
                    "measure": "selected neurons per layer; share in the first + last layer "
                    "(uniform would be 2/L)",
                    "detail": {
                        "per_layer": counts.tolist(),
                        "edge_share": float(edge),
                        "uniform_edge_share": 2 / len(counts),
                    },
                    "verdict": f"{edge:.0%} in first+last layers vs {2 / len(counts):.0%} if uniform",
                }
            )
        if lape.get("deactivation"):
            dominant = lape["deactivation"]["diagonal_dominant"]
            out.append(
                {
                    "claim": "deactivating a language's LAPE neurons hurts that language most, "
                    "random neurons less",
                    "measure": "relative perplexity change, own language vs others; "
                    "same for random matched neurons",
                    "detail": {
                        lang: {
                            "own": lape["deactivation"]["lape"][lang][lang]["relative"],
                            "random_own": lape["deactivation"]["random"][lang][lang]["relative"],
                        }
                        for lang in dominant
                    },
                    "verdict": f"diagonal-dominant for {sum(dominant.values())}/{len(dominant)} languages",
                }
            )
    probes = sections.get("probes")
    if probes:
        p = probes["probes"]
        detail = {name: r["test_accuracy"] for name, r in p.items()}
        first = p.get("clt_0", p.get("residual_0"))
        out.append(
            {
                "claim": "language identity is linearly decodable from the first layer",
                "measure": "held-out probe accuracy per representation (majority baseline alongside)",
                "detail": {**detail, "majority_baseline": p["residual_0"]["majority_baseline"]},
                "verdict": f"layer 0: residual {p['residual_0']['test_accuracy']:.3f}"
                + (f", CLT features {p['clt_0']['test_accuracy']:.3f}" if "clt_0" in p else "")
                + f"; token embedding alone {p['embedding']['test_accuracy']:.3f}; majority "
                f"{first['majority_baseline']:.3f}",
            }
        )
    feats = sections.get("features")
    if feats:
        rows = [f for items in feats["catalogue"].values() for f in items]
        if rows:
            layers = np.array([f["layer"] for f in rows])
            n_layers = feats["n_layers"]
            out.append(
                {
                    "claim": "the best language-identity features are high-frequency, late-layer features",
                    "measure": "layer and in-language frequency of the catalogued features",
                    "detail": {
                        "per_layer": np.bincount(layers, minlength=n_layers).tolist(),
                        "mean_frequency": float(np.mean([f["frequency"] for f in rows])),
                        "per_lang_count": {l: len(v) for l, v in feats["catalogue"].items()},
                    },
                    "verdict": f"{np.mean(layers >= n_layers // 2):.0%} of {len(rows)} catalogued features "
                    "in the "
                    f"second half of the layers; mean in-language frequency "
                    f"{np.mean([f['frequency'] for f in rows]):.3f}",
                }
            )
        else:
            out.append(
                {
                    "claim": "the best language-identity features are high-frequency, late-layer features",
                    "measure": "catalogue of low-entropy, frequent features",
                    "detail": {},
                    "verdict": "no feature met the entropy and frequency criteria",
                }
            )
    return out


def write_report(run_dir: Path, sections: dict, plots: dict[str, Path], title: str) -> dict[str, Path]:
    result = {"findings": findings(sections), "sections": sections}
    report = Report(title)
    report.table(
        "Findings",
        ["claim", "measure", "result"],
        [[f["claim"], f["measure"], f["verdict"]] for f in result["findings"]],
    )
    for name, path in plots.items():
        report.image(name, path)
    catalogue = sections.get("features", {}).get("catalogue", {})
    if catalogue:
        rows = []
        for lang, items in catalogue.items():
            for f in items:
                context = (f.get("contexts") or [{"context": ""}])[0]["context"]
                promotes = " ".join(f.get("promotes", [])[:5]).replace("\n", "⏎")
                rows.append(
                    [
                        lang,
                        f["layer"],
                        f["feature"],
                        f"{f['frequency']:.3f}",
                        f"{f['max_other_frequency']:.3f}",
                        f"{f['entropy_bits']:.2f}",
                        promotes,
                        context[-60:],
                    ]
                )
        report.table(
            "Language-identity CLT features",
            ["lang", "layer", "feature", "freq", "max other", "entropy (bits)", "promotes", "top context"],
            rows,
        )
    linguamap = sections.get("linguamap", {})
    if linguamap.get("cells"):
        from analysis.linguamap import OUTCOMES

        report.table(
            "LinguaMap scenarios (UI-term cloze; scripts/linguamap.py)",
            ["mode", "scenario", "lang", "shots", "n", *OUTCOMES],
            [
                [c["mode"], c["scenario"], c["lang"], c["shots"], c["n"], *(f"{c[o]:.2f}" for o in OUTCOMES)]
                for c in linguamap["cells"]
            ],
        )
    feature_sets = sections.get("feature_sets", {})
    for strategy, ranked in feature_sets.get("sets", {}).items():
        langs = feature_sets.get("langs", list(ranked))
        rows = []
        for lang, items in ranked.items():
            for f in items:
                frequency = f.get("frequency_by_lang", {})
                context = (f.get("contexts") or [{"context": ""}])[0]["context"]
                rows.append(
                    [
                        lang,
                        f["layer"],
                        f["feature"],
                        f"{f['score']:.3g}",
                        " ".join(f"{frequency.get(l, 0.0):.2f}" for l in langs),
                        " ".join(f.get("promotes", [])[:5]).replace("\n", "⏎"),
                        context[-60:],
                    ]
                )
        report.table(
            f"Feature set: {strategy}",
            [
                "lang",
                "layer",
                "feature",
                "score",
                f"frequency ({' '.join(langs)})",
                "promotes",
                "top context",
            ],
            rows,
        )
    return report.write(Path(run_dir), result)
