"""Run every model-diff measure (`analysis/model_diff.py`) on two models and write JSON + HTML + Markdown."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from analysis import model_diff as diff
from analysis.render import Report
from analysis.text_blocks import blocks_by_lang, texts_by_lang
from training import paths
from training.config import RunDir
from training.errors import ModelMismatch, UserError


@dataclass
class ModelDiffConfig:
    """Compare two models (e.g. before/after fine-tuning) through one CLT; HTML + JSON report."""

    before: str = field(default=paths.MODEL_DIR, metadata={"help": "first model (the CLT's own)"})
    after: str = field(default="runs/finetune/adapt-eu-full-0/model", metadata={"help": "second model"})
    clt: str = field(default=paths.CLT_DIR, metadata={"help": "CLT directory (trained on --before)"})
    run_dir: str = field(default="runs/model-diff", metadata={"help": "output run directory"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh", "eu"], metadata={"help": "languages"}
    )
    focus_lang: str = field(
        default="eu", metadata={"help": "the language the fine-tuning targeted (findings)"}
    )
    n_ctx: int = field(default=64, metadata={"help": "block length (BOS included)"})
    blocks_per_lang: int = field(default=32, metadata={"help": "validation blocks per language"})
    identity_per_layer: int = field(default=5, metadata={"help": "identity features per language and layer"})
    graph_prompts: int = field(
        default=4, metadata={"help": "parallel prompts per language for attribution graphs (0 = skip)"}
    )
    graph_tokens: int = field(default=12, metadata={"help": "prompt length for attribution graphs"})
    allow_clt_mismatch: bool = field(
        default=False, metadata={"help": "accept a CLT trained on neither model"}
    )
    method: str = field(
        default="clt",
        metadata={
            "help": "clt: one CLT (trained on --before) on both models; warm-clt: --clt on before, "
            "--warm-clt (train_clt.py --init-from --clt on --after) on after, feature by feature; "
            "crosscoder: one dictionary trained on both (--crosscoder)"
        },
    )
    warm_clt: str = field(default="", metadata={"help": "warm-clt: the CLT continued on --after"})
    crosscoder: str = field(default="", metadata={"help": "crosscoder: directory from train_crosscoder.py"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def load_pair(config: ModelDiffConfig):
    from clt.export import check_matches_model, load_native
    from training.fingerprint import model_fingerprint
    from training.models import load_model

    before, tokenizer = load_model(config.before, config.device)
    after, after_tokenizer = load_model(config.after, before.device)
    if tokenizer.get_vocab() != after_tokenizer.get_vocab():
        raise UserError(
            "the two models use different tokenizers: their features and graphs cannot be compared "
            "token by token"
        )
    clt, meta = load_native(config.clt, device=before.device)
    diff.check_same_architecture(before, after, clt)
    check_matches_model(meta, before, None)  # shapes
    trained_on = {
        name: meta.get("model_sha256") == model_fingerprint(path)
        for name, path in (("before", config.before), ("after", config.after))
    }
    if meta.get("model_sha256") and not any(trained_on.values()) and not config.allow_clt_mismatch:
        raise ModelMismatch(
            f"{config.clt} was trained on neither model (pass --allow-clt-mismatch to diff anyway)"
        )
    return before, after, tokenizer, clt, trained_on


METHODS = ("clt", "warm-clt", "crosscoder")


def load_warm_clt(config: ModelDiffConfig, clt):
    """The CLT continued on --after from --clt: same shape, so feature i means the same in both."""
    from clt.export import load_native

    if not config.warm_clt:
        raise UserError(
            "--method warm-clt needs --warm-clt DIR (train_clt.py --model-dir AFTER --init-from CLT)"
        )
    warm, _ = load_native(config.warm_clt, device=clt.b_dec.device)
    if warm.config != clt.config:
        raise ModelMismatch(f"{config.warm_clt} is not a continuation of {config.clt}: their configs differ")
    return warm


def run_crosscoder_diff(config: ModelDiffConfig, run: RunDir, started: float) -> dict:
    from analysis.crosscoder_diff import crosscoder_diff
    from clt.crosscoder_train import load_crosscoder
    from training.corpus.build import default_corpus_dir, load_corpus
    from training.models import load_model

    if not config.crosscoder:
        raise UserError("--method crosscoder needs --crosscoder DIR (scripts/train_crosscoder.py)")
    crosscoder = load_crosscoder(config.crosscoder)
    meta = json.loads((Path(config.crosscoder) / "config.json").read_text())
    before, tokenizer = load_model(config.before, config.device)
    after, _ = load_model(config.after, before.device)
    crosscoder = crosscoder.to(before.device)
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    blocks = blocks_by_lang(
        tokenizer, texts_by_lang(corpus["validation"], config.langs), config.n_ctx, config.blocks_per_lang
    )
    result = {
        "before": config.before,
        "after": config.after,
        "method": "crosscoder",
        "crosscoder": config.crosscoder,
        "site": meta["site"],
        "layers": meta["layers"],
        "n_layers": before.config.n_layer,
        **crosscoder_diff(
            before, after, tokenizer, crosscoder, meta["site"], meta["layers"], blocks, config.focus_lang
        ),
    }
    result["time_s"] = time.perf_counter() - started
    write_crosscoder_report(run.path, result)
    return {**result, "findings": crosscoder_findings(result)}


def crosscoder_findings(result: dict) -> list[dict]:
    counts = result["latent_counts"]
    focus = result["focus_lang"]
    by_lang = result["after_only_frequency_by_lang"]
    top = max(by_lang, key=by_lang.get) if by_lang else None
    out = [
        {
            "claim": "fine-tuning adds model-specific latents",
            "measure": "latents by relative decoder norm (after-only r > 0.9, before-only r < 0.1)",
            "verdict": f"{counts['b_only']} after-only, {counts['a_only']} before-only, "
            f"{counts['shared']} shared, {counts['dead']} dead",
        },
    ]
    if counts["b_only"]:
        out.append(
            {
                "claim": f"the after-only latents are about {focus}",
                "measure": "summed firing frequency of after-only latents per language",
                "verdict": f"highest on {top} ({by_lang[top]:.3f}; {focus}: {by_lang.get(focus, 0):.3f})",
            }
        )
    lean = result.get("focus_specific_lean")
    if lean:
        out.append(
            {
                "claim": f"the latents most specific to {focus} lean towards the fine-tuned model",
                "measure": f"mean relative decoder norm of the {lean['n']} latents most specific to {focus} "
                "vs random sets of live latents (95% interval; one-sided p)",
                "verdict": f"{lean['observed']:.3f} vs {lean['null_mean']:.3f} [{lean['null_low']:.3f}, "
                f"{lean['null_high']:.3f}], p = {lean['p_at_least']:.3f}",
            }
        )
    layers = result.get("layer_brightening") or []
    depth = result.get("n_layers", 0)
    middle = diff.middle_layers(depth) if depth else set()
    for row in layers:
        late = row["layer"] == depth - 1
        if late or row["layer"] in middle:
            kind, what = (
                ("focus_specific", f"the {focus}-specific latents brighten")
                if late
                else ("cross_lingual", "the cross-lingual latents strengthen")
            )
            test = row[kind]
            out.append(
                {
                    "claim": f"layer {row['layer']}: {what} (seed 003)",
                    "measure": f"mean log2 ‖W_dec^after‖ / ‖W_dec^before‖ of {test['n']} latents vs random "
                    "live sets (95% interval; one-sided p)",
                    "verdict": _lean_text(test),
                }
            )
    for check in result["causal"]:
        own, control = check["delta_loss_latent"], check.get("delta_loss_control", {})
        out.append(
            {
                "claim": f"{result.get('causal_basis', 'after-only')} latent {check['latent']} carries "
                "what fine-tuning added",
                "measure": f"Δ loss of the before model on {focus} when its decoder change (after − before, "
                "× mean activation) is added (control: a shared latent's, same norm)",
                "verdict": f"{own.get(focus, float('nan')):+.3f} nats/token"
                + (f" (control {control.get(focus, float('nan')):+.3f})" if control else ""),
            }
        )
    return out


def write_crosscoder_report(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    findings_rows = crosscoder_findings(result)
    report = Report(f"Crosscoder diff: {result['before']} → {result['after']}")
    report.text(f"Crosscoder `{result['crosscoder']}` at {result['site']} of layers {result['layers']}.")
    report.table(
        "Findings",
        ["claim", "measure", "result"],
        [[f["claim"], f["measure"], f["verdict"]] for f in findings_rows],
    )
    titles = {
        "after_only": f"after-only latents most specific to {result['focus_lang']}",
        "before_only": f"before-only latents most specific to {result['focus_lang']}",
        "most_after_leaning": "the most after-leaning live latents (highest relative norm, any threshold)",
    }
    for kind, title in titles.items():
        if kind not in result:
            continue
        report.table(
            title,
            [
                "latent",
                "relative norm",
                "frequency by language",
                "top tokens",
                "promotes",
                "ν (reconstruction / error)",
            ],
            [
                [
                    d["latent"],
                    f"{d['relative_norm']:.2f}",
                    " ".join(f"{l}:{v:.3f}" for l, v in d["frequency_by_lang"].items()),
                    " ".join(d["top_tokens"]),
                    " ".join(d["promotes"][:5]).replace("\n", "⏎"),
                    _nu(d.get("latent_scaling")),
                ]
                for d in result[kind]
            ],
        )
    if result.get("layer_brightening"):
        report.table(
            "Decoder change per layer: log2 ‖W_dec^after‖ / ‖W_dec^before‖ (model units)",
            [
                "layer",
                "all live latents",
                f"{result['focus_lang']}-specific vs random live sets",
                "cross-lingual (fire on ≥ 1% of every language) vs random live sets",
            ],
            [
                [
                    row["layer"],
                    f"{row['all_live_mean_log2']:+.3f}",
                    _lean_text(row["focus_specific"]),
                    f"n = {row['cross_lingual']['n']}: " + _lean_text(row["cross_lingual"]),
                ]
                for row in result["layer_brightening"]
            ],
        )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([(i + 0.5) / 20 for i in range(20)], result["relative_norm_histogram"], width=0.05)
    ax.set_xlabel("relative decoder norm ‖W_after‖ / (‖W_before‖ + ‖W_after‖)")
    ax.set_ylabel("live latents")
    fig.tight_layout()
    fig.savefig(out / "relative_norms.png", dpi=110)
    plt.close(fig)
    report.image("Relative decoder norms", out / "relative_norms.png")
    report.write(out, {**result, "findings": findings_rows})


def _lean_text(test: dict) -> str:
    return (
        f"{test['observed']:+.3f} vs {test['null_mean']:+.3f} [{test['null_low']:+.3f}, "
        f"{test['null_high']:+.3f}], p = {test['p_at_least']:.3f}"
    )


def _nu(scaling: dict | None) -> str:
    return "" if not scaling else f"{scaling['nu_reconstruction']:.2f} / {scaling['nu_error']:.2f}"


def run_model_diff(config: ModelDiffConfig) -> dict:
    from attribution.pipeline import build_graph
    from attribution.query import to_networkx
    from training.corpus.build import default_corpus_dir, load_corpus, parallel_sets
    from training.tokenizer import fertility

    started = time.perf_counter()
    if config.method not in METHODS:
        raise UserError(f"unknown --method {config.method!r}; choose from {METHODS}")
    run = RunDir.open(config.run_dir, config)
    if (run.path / "report.json").exists():  # finished with this very config: nothing to redo
        return json.loads((run.path / "report.json").read_text())
    if config.method == "crosscoder":
        return run_crosscoder_diff(config, run, started)
    before, after, tokenizer, clt, trained_on = load_pair(config)
    after_clt = load_warm_clt(config, clt) if config.method == "warm-clt" else clt
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    validation = texts_by_lang(corpus["validation"], config.langs)
    blocks = blocks_by_lang(tokenizer, validation, config.n_ctx, config.blocks_per_lang)

    stats = {
        name: diff.clt_statistics(model, dictionary, blocks)
        for name, model, dictionary in tqdm(
            (("before", before, clt), ("after", after, after_clt)), desc="CLT statistics", total=2
        )
    }
    identity = diff.identity_features(stats["before"]["frequency"], config.langs, config.identity_per_layer)
    result = {
        "before": config.before,
        "after": config.after,
        "clt": config.clt,
        "clt_trained_on": trained_on,
        "langs": config.langs,
        "n_layers": clt.config.n_layers,
        "blocks_per_lang": config.blocks_per_lang,
        "clt_fvu": {name: s["fvu"] for name, s in stats.items()},
        "clt_l0": {name: s["l0"] for name, s in stats.items()},
        "feature_change": feature_change(stats),
        "identity_features": identity,
        "brightening": diff.brightening(stats["before"], stats["after"], identity),
        "fertility": diff.fertility_and_early_features(
            fertility(
                tokenizer,
                [t for lang in config.langs for t in validation[lang]],
                [lang for lang in config.langs for _ in validation[lang]],
            ),
            stats,
        ),
        "lens_kl": diff.lens_kl(before, after, blocks),
        "method": config.method,
    }
    if config.method == "warm-clt":
        result["feature_drift"] = diff.feature_drift(clt, after_clt, identity)
    if config.graph_prompts > 0:
        sets = list(parallel_sets(corpus, config.langs).values())[: config.graph_prompts]
        graphs = {"before": {lang: [] for lang in config.langs}, "after": {lang: [] for lang in config.langs}}
        for texts in tqdm(sets, desc="attribution graphs"):
            for lang in config.langs:
                for name, model, dictionary in (("before", before, clt), ("after", after, after_clt)):
                    graph, pruned = build_graph(
                        model, tokenizer, dictionary, texts[lang], lang=lang, max_tokens=config.graph_tokens
                    )
                    graphs[name][lang].append(to_networkx(graph, pruned))
        result["graphs"] = diff.graph_differences(graphs, clt.config.n_layers)
    result["findings"] = findings(result, config.focus_lang)
    result["time_s"] = time.perf_counter() - started
    write_report(run.path, result)
    return result


def feature_change(stats: dict) -> dict:
    """Per language and layer: mean frequency and strength of all features, before and after."""
    out = {}
    for k, lang in enumerate(stats["before"]["langs"]):
        out[lang] = {}
        for name, s in stats.items():
            freq, strength = s["frequency"][:, :, k], s["strength"][:, :, k]
            out[lang][f"l0_{name}"] = s["l0"][lang]
            out[lang][f"strength_{name}"] = ((freq * strength).sum(1) / freq.sum(1).clamp_min(1e-12)).tolist()
    return out


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def findings(result: dict, lang: str) -> list[dict]:
    """Seed 003's claims on the focus language, answered with this diff's numbers."""
    out = []
    if lang not in result["langs"]:
        return out
    L = result["n_layers"]
    late = result["brightening"].get(lang, {}).get(str(L - 1))
    claim = f"fine-tuning brightens {lang}'s late-layer identity features"
    if late and late["mass_log2_ratio"] is not None:
        weak = " (they barely fire: frequency < 1%)" if late["frequency_before"] < 0.01 else ""
        out.append(
            {
                "claim": claim,
                "measure": f"layer {L - 1}: log2(after/before) of mean activation per token "
                f"{late['mass_log2_ratio']:+.2f} "
                f"(frequency {_signed(late['frequency_log2_ratio'])}, strength "
                f"{_signed(late['strength_log2_ratio'])}){weak}",
                "verdict": "yes" if late["mass_log2_ratio"] > 0 else "no",
            }
        )
    elif late and late["mass_before"] > 0:
        out.append(
            {
                "claim": claim,
                "measure": f"layer {L - 1}: its {len(late['features'])} identity feature(s) fire on "
                f"{100 * late['frequency_before']:.2f}% of {lang} tokens before and never after",
                "verdict": "no (silenced)",
            }
        )
    else:
        out.append(
            {
                "claim": claim,
                "measure": f"no {lang}-specific feature fires in layer {L - 1} on the before model",
                "verdict": "not measurable",
            }
        )
    graphs = result.get("graphs", {}).get("per_lang", {}).get(lang)
    if graphs:
        b, a = graphs["middle_cluster_strength_before"], graphs["middle_cluster_strength_after"]
        out.append(
            {
                "claim": f"fine-tuning strengthens middle-layer cross-lingual clusters in {lang} graphs",
                "measure": f"share of edge weight leaving shared middle-layer features {b:.3f} → {a:.3f} "
                f"(error nodes' share {graphs['error_share_before']:.3f} → "
                f"{graphs['error_share_after']:.3f})",
                "verdict": "yes" if a > b else "no",
            }
        )
    r = result["fertility"].get("corr_fertility_layer0_l0_before")
    if r is not None:
        out.append(
            {
                "claim": "languages the tokenizer splits more use more early-layer features",
                "measure": "Pearson r(tokens per word, layer-0 active features per token) over "
                f"{len(result['langs'])} "
                f"languages: before {r:+.2f}, after "
                f"{result['fertility']['corr_fertility_layer0_l0_after']:+.2f}",
                "verdict": "yes" if r > 0.5 else "weak" if r > 0 else "no",
            }
        )
    fvu = result["clt_fvu"]
    out.append(
        {
            "claim": "the shared CLT still describes the second model",
            "measure": f"{lang} FVU per layer before {[round(v, 3) for v in fvu['before'][lang]]}, after "
            f"{[round(v, 3) for v in fvu['after'][lang]]}",
            "verdict": "caution: CLT drifted"
            if max(fvu["after"][lang]) > 2 * max(fvu["before"][lang]) + 0.05
            else "yes",
        }
    )
    return out


# ---------------------------------------------------------------------------------------------
# Plots and pages
# ---------------------------------------------------------------------------------------------


def plot_all(result: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs, L = result["langs"], result["n_layers"]
    layers = list(range(L))
    paths = {}

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for lang in langs:
        (line,) = axes[0].plot(layers, result["clt_fvu"]["before"][lang], marker="o", label=lang)
        axes[0].plot(layers, result["clt_fvu"]["after"][lang], ls="--", marker="x", color=line.get_color())
        change = result["feature_change"][lang]
        axes[1].plot(
            layers,
            [a / b if b else float("nan") for a, b in zip(change["l0_after"], change["l0_before"])],
            marker="o",
            label=lang,
        )
        axes[2].plot(layers, result["lens_kl"][lang], marker="o", label=lang)
    for ax in axes:
        ax.set_xticks(layers)
    axes[0].set(
        title="CLT FVU per layer (solid before, dashed after)", xlabel="layer", ylabel="FVU", yscale="log"
    )
    axes[1].set(title="active CLT features per token, after / before", xlabel="layer", ylabel="ratio")
    axes[1].axhline(1, color="grey", lw=1)
    axes[2].set(title="logit-lens KL(before ‖ after)", xlabel="layer", ylabel="nats", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["CLT reconstruction, feature activity and logit-lens KL"] = out / "features_lens.png"
    fig.savefig(paths["CLT reconstruction, feature activity and logit-lens KL"], dpi=110)
    plt.close(fig)

    matrix = torch.full((len(langs), L), float("nan"))
    for i, lang in enumerate(langs):
        for layer, entry in result["brightening"].get(lang, {}).items():
            if entry["mass_log2_ratio"] is not None:
                matrix[i, int(layer)] = entry["mass_log2_ratio"]
    fig, ax = plt.subplots(figsize=(1.2 * L + 3, 0.5 * len(langs) + 2))
    bound = max(0.1, float(matrix.nan_to_num(0).abs().max()))
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set(
        xticks=layers,
        yticks=range(len(langs)),
        yticklabels=langs,
        xlabel="layer",
        title="identity features: log2(after / before) mean activation on own language",
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    paths["Brightening / dimming of language-identity features"] = out / "brightening.png"
    fig.savefig(paths["Brightening / dimming of language-identity features"], dpi=110)
    plt.close(fig)

    rows = result["fertility"]["per_lang"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for lang, row in rows.items():
        ax.scatter(row["tokens_per_word"], row["layer0_l0_before"], color="C0")
        ax.scatter(row["tokens_per_word"], row["layer0_l0_after"], color="C1", marker="x")
        ax.annotate(
            lang, (row["tokens_per_word"], row["layer0_l0_before"]), xytext=(3, 3), textcoords="offset points"
        )
    ax.set(
        xlabel="tokens per word",
        ylabel="layer-0 active features per token",
        title="fertility vs early features (o before, x after)",
    )
    fig.tight_layout()
    paths["Tokenizer fertility and layer-0 features"] = out / "fertility.png"
    fig.savefig(paths["Tokenizer fertility and layer-0 features"], dpi=110)
    plt.close(fig)

    if "graphs" in result:
        per_lang = result["graphs"]["per_lang"]
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = torch.arange(len(langs)).float()
        ax.bar(
            xs - 0.2,
            [per_lang[lang]["middle_cluster_strength_before"] for lang in langs],
            0.4,
            label="before",
        )
        ax.bar(
            xs + 0.2, [per_lang[lang]["middle_cluster_strength_after"] for lang in langs], 0.4, label="after"
        )
        ax.set(
            xticks=xs.tolist(),
            xticklabels=langs,
            ylabel="share of |edge weight|",
            title="middle-layer cross-lingual cluster strength",
        )
        ax.legend()
        fig.tight_layout()
        paths["Attribution graphs: cross-lingual clusters"] = out / "clusters.png"
        fig.savefig(paths["Attribution graphs: cross-lingual clusters"], dpi=110)
        plt.close(fig)
    return paths


def summary_rows(result: dict) -> list[list[str]]:
    rows = []
    for lang in result["langs"]:
        fvu_b, fvu_a = result["clt_fvu"]["before"][lang], result["clt_fvu"]["after"][lang]
        g = result.get("graphs", {}).get("per_lang", {}).get(lang, {})
        rows.append(
            [
                lang,
                f"{sum(fvu_b) / len(fvu_b):.3f} → {sum(fvu_a) / len(fvu_a):.3f}",
                " / ".join(f"{v:.3f}" for v in result["lens_kl"][lang]),
                f"{result['fertility']['per_lang'][lang]['tokens_per_word']:.2f}",
                ""
                if not g
                else f"{g['edge_relative_change']:.2f}"
                if g["edge_relative_change"] is not None
                else "",
                ""
                if not g
                else f"{g['middle_cluster_strength_before']:.3f} → {g['middle_cluster_strength_after']:.3f}",
            ]
        )
    return rows


def write_report(out: Path, result: dict) -> None:
    plots = plot_all(result, out)
    report = Report(f"Model diff: {result['before']} → {result['after']}")
    report.text(f"CLT `{result['clt']}` (trained on: {result['clt_trained_on']})")
    report.table(
        "Findings",
        ["claim", "measure", "result"],
        [[f["claim"], f["measure"], f["verdict"]] for f in result["findings"]],
    )
    report.table(
        "Per language",
        [
            "lang",
            "mean CLT FVU before → after",
            "lens KL per layer",
            "tokens/word",
            "graph edge change",
            "middle cluster strength",
        ],
        summary_rows(result),
    )
    for name, path in plots.items():
        report.image(name, path)
    report.write(out, result)
