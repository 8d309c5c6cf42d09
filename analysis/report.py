"""The "which layers and units speak which language" report: findings computed from the section
results, written as JSON (every number), Markdown and a self-contained HTML page (plots inline)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from training.config import atomic_write_json, atomic_write_text


def findings(sections: dict) -> list[dict]:
    """The seed papers' claims, each with the number behind it (only for the sections that were run)."""
    out = []
    lens = sections.get("lens")
    if lens:
        n_layers = lens["n_layers"]
        leads = {lang: e["own_language_leads_from_layer"] for lang, e in lens["by_prompt_lang"].items()}
        middle = n_layers // 2
        detail = {lang: {"leads_from_layer": leads[lang],
                         "p_own_middle": e["soft"][lang][middle], "p_own_last": e["soft"][lang][-1],
                         "leader_middle": e["leader_per_layer"][middle]} for lang, e in lens["by_prompt_lang"].items()}
        late = [lang for lang, layer in leads.items() if layer is not None and layer >= n_layers - 2]
        out.append({"claim": "the prompt's language wins only in the last layers (logit lens)",
                    "measure": f"first layer from which the soft lens's top language is the prompt's own, of {n_layers} layers",
                    "detail": detail,
                    "verdict": f"{len(late)}/{len(leads)} languages lead only from layer ≥ {n_layers - 2}; never lead: "
                               f"{[l for l, v in leads.items() if v is None]}"})
    sim = sections.get("similarity")
    if sim:
        gap = sim["mean"]["centred"]["gap"]
        peak = sim["centred_gap_peak_layer"]
        out.append({"claim": "parallel − non-parallel similarity peaks in the middle layers",
                    "measure": "centred cosine gap per layer (mean over language pairs)",
                    "detail": {"centred_gap": gap, "raw_gap": sim["mean"]["raw"]["gap"], "peak_layer": peak},
                    "verdict": f"peak at layer {peak} of {len(gap)} ({'middle' if 0 < peak < len(gap) - 1 else 'edge'})"})
    lape = sections.get("lape")
    if lape:
        for name, selection in lape["selections"].items():
            counts = np.array(selection["selected_per_layer"])
            edge = (counts[0] + counts[-1]) / max(counts.sum(), 1)
            out.append({"claim": f"LAPE neurons ({name}) concentrate in the first and last layers",
                        "measure": "selected neurons per layer; share in the first + last layer (uniform would be 2/L)",
                        "detail": {"per_layer": counts.tolist(), "edge_share": float(edge), "uniform_edge_share": 2 / len(counts)},
                        "verdict": f"{edge:.0%} in first+last layers vs {2 / len(counts):.0%} if uniform"})
        if lape.get("deactivation"):
            dominant = lape["deactivation"]["diagonal_dominant"]
            out.append({"claim": "deactivating a language's LAPE neurons hurts that language most, random neurons less",
                        "measure": "relative perplexity change, own language vs others; same for random matched neurons",
                        "detail": {lang: {"own": lape["deactivation"]["lape"][lang][lang]["relative"],
                                          "random_own": lape["deactivation"]["random"][lang][lang]["relative"]}
                                   for lang in dominant},
                        "verdict": f"diagonal-dominant for {sum(dominant.values())}/{len(dominant)} languages"})
    probes = sections.get("probes")
    if probes:
        p = probes["probes"]
        detail = {name: r["test_accuracy"] for name, r in p.items()}
        first = p.get("clt_0", p.get("residual_0"))
        out.append({"claim": "language identity is linearly decodable from the first layer",
                    "measure": "held-out probe accuracy per representation (majority baseline alongside)",
                    "detail": {**detail, "majority_baseline": p["residual_0"]["majority_baseline"]},
                    "verdict": f"layer 0: residual {p['residual_0']['test_accuracy']:.3f}"
                               + (f", CLT features {p['clt_0']['test_accuracy']:.3f}" if "clt_0" in p else "")
                               + f"; token embedding alone {p['embedding']['test_accuracy']:.3f}; majority {first['majority_baseline']:.3f}"})
    feats = sections.get("features")
    if feats:
        rows = [f for items in feats["catalogue"].values() for f in items]
        if rows:
            layers = np.array([f["layer"] for f in rows])
            n_layers = feats["n_layers"]
            out.append({"claim": "the best language-identity features are high-frequency, late-layer features",
                        "measure": "layer and in-language frequency of the catalogued features",
                        "detail": {"per_layer": np.bincount(layers, minlength=n_layers).tolist(),
                                   "mean_frequency": float(np.mean([f["frequency"] for f in rows])),
                                   "per_lang_count": {l: len(v) for l, v in feats["catalogue"].items()}},
                        "verdict": f"{np.mean(layers >= n_layers // 2):.0%} of {len(rows)} catalogued features in the "
                                   f"second half of the layers; mean in-language frequency {np.mean([f['frequency'] for f in rows]):.3f}"})
        else:
            out.append({"claim": "the best language-identity features are high-frequency, late-layer features",
                        "measure": "catalogue of low-entropy, frequent features", "detail": {},
                        "verdict": "no feature met the entropy and frequency criteria"})
    return out


def html_page(title: str, body: list[str]) -> str:
    """A self-contained HTML page (plots are inlined with `inline_image`)."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}td{vertical-align:top}</style></head><body>"
            + "\n".join(body) + "</body></html>")


def inline_image(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'


def write_report(run_dir: Path, sections: dict, plots: dict[str, Path], title: str) -> dict[str, Path]:
    run_dir = Path(run_dir)
    result = {"findings": findings(sections), "sections": sections}
    atomic_write_json(run_dir / "report.json", result)
    md = [f"# {title}", "", "## Findings", "", "| claim | measure | result |", "|---|---|---|"]
    md += [f"| {f['claim']} | {f['measure']} | {f['verdict']} |" for f in result["findings"]]
    for name, path in plots.items():
        md += ["", f"## {name}", "", f"![{name}]({path.name})"]
    catalogue = sections.get("features", {}).get("catalogue", {})
    if catalogue:
        md += ["", "## Language-identity CLT features", "", "| lang | layer | feature | freq | max other | entropy (bits) | promotes | top context |",
               "|---|---|---|---|---|---|---|---|"]
        for lang, items in catalogue.items():
            for f in items:
                context = (f.get("contexts") or [{"context": ""}])[0]["context"].replace("|", "\\|").replace("\n", " ")
                promotes = " ".join(f.get("promotes", [])[:5]).replace("|", "\\|").replace("\n", "⏎")
                md.append(f"| {lang} | {f['layer']} | {f['feature']} | {f['frequency']:.3f} | {f['max_other_frequency']:.3f} | "
                          f"{f['entropy_bits']:.2f} | {promotes} | {context[-60:]} |")
    atomic_write_text(run_dir / "report.md", "\n".join(md) + "\n")
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Findings</h2><table border=1 cellpadding=4><tr><th>claim</th><th>measure</th><th>result</th></tr>"]
    body += [f"<tr><td>{html.escape(f['claim'])}</td><td>{html.escape(f['measure'])}</td><td>{html.escape(f['verdict'])}</td></tr>"
             for f in result["findings"]]
    body.append("</table>")
    for name, path in plots.items():
        body += [f"<h2>{html.escape(name)}</h2>", inline_image(path)]
    body.append("<h2>All numbers</h2><details><summary>report.json</summary><pre>"
                + html.escape(json.dumps(result, indent=1, default=str)[:200000]) + "</pre></details>")
    atomic_write_text(run_dir / "report.html", html_page(title, body))
    return {"json": run_dir / "report.json", "markdown": run_dir / "report.md", "html": run_dir / "report.html"}
