"""The seed papers' claims as measured numbers, each with its uncertainty and a verdict by a written rule.

Every function takes stage output files (JSON) and returns a `ClaimResult` whose numbers are
`analysis.provenance` numbers — read from those files or derived from them — so the report built from
them holds no literals. The verdict rules are stated in `RULES` and printed in the report.

Uncertainty: ± is two standard errors (over languages, or the standard error a stage wrote) or a 95%
Wilson interval for accuracies; "reproduced" needs the effect beyond that band, "not reproduced" needs the
band to exclude it, and anything between is "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from analysis.provenance import Number, derive, read
from training.errors import UserError

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

RULES = {
    "a": "reproduced if, in some middle layer (not the first or last), parallel paragraphs share more "
    "pruned-graph features across languages than the shuffled null by more than 2 standard errors, and the "
    "largest such excess is in a middle layer; not reproduced if no layer exceeds the null by 2 standard "
    "errors; inconclusive otherwise (the excess peaks at an edge layer)",
    "b": "reproduced if the logit lens's probability of the prompt's own language rises from the middle "
    "layer to the last by more than 2 standard errors (over prompt languages); not reproduced if it falls "
    "by more than 2; inconclusive otherwise",
    "c": "reproduced if the lower 95% Wilson bound of the layer-0 residual probe's held-out accuracy is "
    "above 0.5 and above the majority baseline; not reproduced if its upper bound is below 0.5; inconclusive "
    "otherwise",
    "d": "reproduced if, at a fluency cost of at most the largest budget (Δ loss in nats/token), features "
    "chosen by their output effect reach the target language more often than random features of the same "
    "layers by more than 2 standard errors of the paired difference over language pairs, and more often than "
    "the unsteered model; not reproduced if the paired difference is below −2 standard errors or the "
    "features do no better than the unsteered model; inconclusive otherwise",
    "e": "the rule of (a), applied to the model trained without English",
    "f": "reproduced if the latents most specific to the fine-tuned language (in a crosscoder trained on "
    "both models) have a mean relative decoder norm above the 95% interval of random sets of live latents "
    "(they lean towards the fine-tuned model); not reproduced if below it; inconclusive inside it",
    "g": "reproduced if full fine-tuning raises the protocol's language consistency (test items) by "
    "more than 2 standard errors over seeds, the selective strategy reaches at least 98% of full "
    "fine-tuning's consistency with the ratio's 2-standard-error band above 0.98, and it beats the random "
    "subset of the same kind and size by more than 2 standard errors; not reproduced if the band of the "
    "ratio lies below 0.98 or the random subset is better by more than 2 standard errors; inconclusive "
    "otherwise (including when full fine-tuning has nothing to gain). Each strategy is read at its own "
    "learning rate, chosen on the validation items",
    "h": "reproduced if the consistency bottleneck appears when the query's language differs from the "
    "answer's: the share of items where the translation outranks the expected term (likelihood, 0 shots) "
    "is larger with an English query (scenario 4) than with a query in the answer's language (scenario 2) "
    "by more than 2 standard errors over (mixture, language) cells; not reproduced if smaller by more than "
    "2; inconclusive otherwise. The transfer bottleneck (right language, wrong term) is reported beside it",
}


@dataclass
class ClaimResult:
    key: str
    claim: str
    measure: str
    number: Number
    uncertainty: Number | None  # the ± band (see the module docstring)
    verdict: str
    rule: str
    command: str
    sources: list[str]
    details: dict[str, Number] = field(default_factory=dict)
    plot: str | None = None

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "claim": self.claim,
            "measure": self.measure,
            "number": self.number.to_json(),
            "uncertainty": self.uncertainty.to_json() if self.uncertainty is not None else None,
            "verdict": self.verdict,
            "rule": self.rule,
            "command": self.command,
            "sources": self.sources,
            "details": {name: value.to_json() for name, value in self.details.items()},
            "plot": self.plot,
        }


def _undefined(*numbers: Number) -> bool:
    return any(math.isnan(n.value) for n in numbers)  # too few samples for a number or its band


def _mean_and_band(values: list[Number]) -> tuple[Number, Number]:
    """The mean of per-unit effects (languages, pairs, cells) and its band of two standard errors."""
    return derive("mean", *values), derive("twice", derive("sem", *values))


def _band_verdict(effect: Number, band: Number) -> str:
    if _undefined(effect, band):
        return INCONCLUSIVE
    if effect.value > band.value:
        return REPRODUCED
    if effect.value < -band.value:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def shared_middle_layers(overlap_json: Path, model: str, key: str = "a", command: str = "") -> ClaimResult:
    """(a)/(e): per layer, Jaccard overlap of parallel paragraphs' pruned-graph features minus the
    shuffled null (different paragraphs), with the standard errors the overlap stage wrote."""
    n_layers = int(read(overlap_json, "/n_layers").value)
    excess, band = [], []
    for layer in range(n_layers):
        parallel = read(overlap_json, f"/all/jaccard/{layer}")
        null = read(overlap_json, f"/all/null_jaccard/{layer}")
        se = derive(
            "quadrature",
            read(overlap_json, f"/all_sem/jaccard/{layer}"),
            read(overlap_json, f"/all_sem/null_jaccard/{layer}"),
        )
        excess.append(derive("difference", parallel, null))
        band.append(derive("twice", se))
    middle = range(1, n_layers - 1)
    best = max(middle, key=lambda layer: excess[layer].value) if n_layers > 2 else 0
    peak = max(range(n_layers), key=lambda layer: excess[layer].value)
    significant = [layer for layer in range(n_layers) if excess[layer].value > band[layer].value]
    if _undefined(excess[best], band[best]):
        verdict = INCONCLUSIVE
    elif best in significant and peak == best:
        verdict = REPRODUCED
    elif not significant:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return ClaimResult(
        key=key,
        claim=f"middle layers share features across languages ({model})",
        measure=f"largest middle-layer excess of cross-language feature overlap (Jaccard) over the shuffled "
        f"null, layer {best} of {n_layers}",
        number=excess[best],
        uncertainty=band[best],
        verdict=verdict,
        rule=RULES[key],
        command=command,
        sources=[str(overlap_json)],
        details={f"excess, layer {layer}": excess[layer] for layer in range(n_layers)},
    )


def late_language_decoding(locate_report: Path, model: str, command: str = "") -> ClaimResult:
    """(b): the logit lens's own-language probability, last layer minus middle layer, per prompt language."""
    langs = [str(lang) for lang in _list(locate_report, "/sections/lens/langs")]
    n_layers = int(read(locate_report, "/sections/lens/n_layers").value)
    middle, last = (n_layers - 1) // 2, n_layers - 1
    rises = {}
    for lang in langs:
        base = f"/sections/lens/by_prompt_lang/{lang}/soft/{lang}"
        rises[lang] = derive(
            "difference", read(locate_report, f"{base}/{last}"), read(locate_report, f"{base}/{middle}")
        )
    mean, band = _mean_and_band(list(rises.values()))
    return ClaimResult(
        key="b",
        claim=f"language-specific decoding happens in the late layers ({model})",
        measure=f"own-language probability of the soft logit lens, layer {last} minus layer {middle}, mean "
        f"over {len(langs)} prompt languages",
        number=mean,
        uncertainty=band,
        verdict=_band_verdict(mean, band),
        rule=RULES["b"],
        command=command,
        sources=[str(locate_report)],
        details={f"rise, {lang}": value for lang, value in rises.items()},
    )


def early_language_identity(locate_report: Path, model: str, command: str = "") -> ClaimResult:
    """(c): held-out accuracy of a linear language probe on the layer-0 residual stream."""
    probe = "/sections/probes/probes/residual_0"
    accuracy = read(locate_report, f"{probe}/test_accuracy")
    n = read(locate_report, "/sections/probes/n_test_blocks")
    low, high = derive("wilson_low", accuracy, n), derive("wilson_high", accuracy, n)
    majority = read(locate_report, f"{probe}/majority_baseline")
    if _undefined(low, high):
        verdict = INCONCLUSIVE
    elif low.value > 0.5 and low.value > majority.value:
        verdict = REPRODUCED
    elif high.value < 0.5:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return ClaimResult(
        key="c",
        claim=f"language identity is linearly decodable from the early layers ({model})",
        measure="held-out accuracy of a linear probe on the layer-0 residual (95% Wilson bounds over test "
        "blocks)",
        number=accuracy,
        uncertainty=derive("difference", accuracy, low),
        verdict=verdict,
        rule=RULES["c"],
        command=command,
        sources=[str(locate_report)],
        details={
            "95% lower bound": low,
            "95% upper bound": high,
            "majority baseline": majority,
            "embedding-only probe": read(locate_report, "/sections/probes/probes/embedding/test_accuracy"),
        },
    )


def steering_swaps_language(summary_json: Path, model: str, command: str = "") -> ClaimResult:
    """(d): success (continuation in the target language, fluent) of output-selected features vs random
    features of the same layers, paired per language pair, at the largest fluency budget."""
    import json

    summary = json.loads(Path(summary_json).read_text())
    budget = str(float(max(summary["config"]["budgets"])))
    base = "/frontier/greedy"
    per_pair = summary["frontier"]["greedy"]["per_pair"]
    pairs = [p for p, cell in per_pair.items() if "output" in cell and "random-output" in cell]
    if len(pairs) < 2:
        raise UserError(
            f"{summary_json}: output-selected and random features were both measured on {len(pairs)} "
            "language pair(s); the steering claim needs at least 2 (see the stage's metrics.jsonl for errors)"
        )
    gains = [
        derive(
            "difference",
            read(summary_json, f"{base}/per_pair/{p}/output/{budget}/0"),
            read(summary_json, f"{base}/per_pair/{p}/random-output/{budget}/0"),
        )
        for p in pairs
    ]
    gain, band = _mean_and_band(gains)
    output = read(summary_json, f"{base}/mean/output/{budget}/mean_ci/0")
    unsteered = read(summary_json, f"{base}/mean/none/{budget}/mean_ci/0")
    verdict = _band_verdict(gain, band)
    if verdict == REPRODUCED and output.value <= unsteered.value:
        verdict = NOT_REPRODUCED
    details = {
        "output features: success": output,
        "output features: 95% low": read(summary_json, f"{base}/mean/output/{budget}/mean_ci/1"),
        "output features: 95% high": read(summary_json, f"{base}/mean/output/{budget}/mean_ci/2"),
        "random features: success": read(summary_json, f"{base}/mean/random-output/{budget}/mean_ci/0"),
        "unsteered: success": unsteered,
    }
    if "diffmean" in summary["frontier"]["greedy"]["mean"]:
        details["diff-of-means direction: success"] = read(
            summary_json, f"{base}/mean/diffmean/{budget}/mean_ci/0"
        )
    return ClaimResult(
        key="d",
        claim=f"steering features swaps the output language ({model})",
        measure=f"success of output-selected features minus random features of the same layers at Δ loss ≤ "
        f"{budget} nats/token, mean over {len(pairs)} language pairs (greedy continuations)",
        number=gain,
        uncertainty=band,
        verdict=verdict,
        rule=RULES["d"],
        command=command,
        sources=[str(summary_json)],
        details=details,
    )


def weak_language_brightens(report_json: Path, pair: str, command: str = "") -> ClaimResult:
    """(f): in a crosscoder of the model before and after fine-tuning on a weak language, do that
    language's most specific latents lean towards the after model (relative decoder norm)?"""
    lean = "/focus_specific_lean"
    observed, null = read(report_json, f"{lean}/observed"), read(report_json, f"{lean}/null_mean")
    low, high = read(report_json, f"{lean}/null_low"), read(report_json, f"{lean}/null_high")
    if _undefined(observed, low, high):
        verdict = INCONCLUSIVE
    elif observed.value > high.value:
        verdict = REPRODUCED
    elif observed.value < low.value:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    import json

    focus = json.loads(Path(report_json).read_text())["focus_lang"]
    return ClaimResult(
        key="f",
        claim=f"fine-tuning a weak language ({focus}) brightens its features ({pair})",
        measure=f"mean relative decoder norm (after / (before + after)) of the crosscoder latents most "
        f"specific to {focus}, minus that of random sets of live latents; ± is half the random sets' 95% "
        "interval",
        number=derive("difference", observed, null),
        uncertainty=derive("half", derive("difference", high, low)),
        verdict=verdict,
        rule=RULES["f"],
        command=command,
        sources=[str(report_json)],
        details={
            f"{focus}-specific latents: mean relative norm": observed,
            "random sets: 95% low": low,
            "random sets: 95% high": high,
            "one-sided p": read(report_json, f"{lean}/p_at_least"),
            "after-only latents (r > 0.9)": read(report_json, "/latent_counts/b_only"),
            "shared latents (0.3 ≤ r ≤ 0.7)": read(report_json, "/latent_counts/shared"),
        },
    )


def _chosen_runs(comparison_json: Path, scenario: str, variant: str) -> tuple[int, list[int]]:
    """(index of the variant's table line at its chosen learning rate, indices of that rate's runs)."""
    import json

    doc = json.loads(Path(comparison_json).read_text())
    lines = [
        i
        for i, line in enumerate(doc["table"])
        if line["scenario"] == scenario and line["variant"] == variant and line.get("chosen")
    ]
    if not lines:
        raise UserError(f"{comparison_json} has no finished {variant!r} runs of the {scenario} scenario")
    lr = doc["table"][lines[0]]["lr"]
    runs = [
        i
        for i, row in enumerate(doc["runs"])
        if (row["scenario"], row["variant"], row.get("lr")) == (scenario, variant, lr)
        and "skipped" not in row
    ]
    return lines[0], runs


def selective_matches_full(
    comparison_json: Path, selective: str, random: str, model: str, command: str = "",
    scenario: str = "linguamap",
) -> ClaimResult:  # fmt: skip
    """(g): language consistency after fine-tuning a selective strategy vs full fine-tuning vs a random
    subset matched to the selective strategy, each at its validation-chosen learning rate, over seeds."""

    def seeds(variant: str) -> tuple[Number, Number, int]:
        line, runs = _chosen_runs(comparison_json, scenario, variant)
        values = [read(comparison_json, f"/runs/{i}/target_after") for i in runs]
        return derive("mean", *values), derive("sem", *values), line

    full, full_se, full_line = seeds("full")
    chosen, chosen_se, chosen_line = seeds(selective)
    matched, matched_se, matched_line = seeds(random)
    before = read(comparison_json, f"/table/{full_line}/target_before")
    full_gain = derive("difference", full, before)
    ratio = derive("ratio", chosen, full)
    band = derive("ratio_band", chosen, chosen_se, full, full_se)
    versus_random = derive("difference", chosen, matched)
    random_band = derive("twice", derive("quadrature", chosen_se, matched_se))
    details = {
        "before fine-tuning: consistency": before,
        "full: consistency": full,
        f"{selective}: consistency": chosen,
        f"{random}: consistency": matched,
        f"{selective} − {random}": versus_random,
        f"{selective} − {random}: ± (2 SE)": random_band,
    }
    for name, line in (("full", full_line), (selective, chosen_line), (random, matched_line)):
        if _label(comparison_json, f"/table/{line}/lr") is not None:  # (None: the fine-tuning default)
            details[f"{name}: learning rate"] = read(comparison_json, f"/table/{line}/lr")
    if _undefined(ratio, band, versus_random, random_band, full_gain, full_se):
        verdict = INCONCLUSIVE
    elif ratio.value + band.value < 0.98 or versus_random.value < -random_band.value:
        verdict = NOT_REPRODUCED
    elif (
        full_gain.value > 2 * full_se.value
        and ratio.value - band.value >= 0.98
        and versus_random.value > random_band.value
    ):
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return ClaimResult(
        key="g",
        claim=f"selective fine-tuning ({selective}) ≈ full fine-tuning in language consistency with a few % "
        f"of the parameters, and beats a random subset ({model})",
        measure=f"language consistency of {selective} / full fine-tuning (LinguaMap protocol, greedy answers "
        "on the test items, mean over seeds, each at its validation-chosen learning rate)",
        number=ratio,
        uncertainty=band,
        verdict=verdict,
        rule=RULES["g"],
        command=command,
        sources=[str(comparison_json)],
        details={
            **details,
            f"{selective}: trainable share": read(comparison_json, f"/table/{chosen_line}/trainable_share"),
            "full: forgetting (Δ loss)": read(comparison_json, f"/table/{full_line}/forgetting/0"),
            f"{selective}: forgetting (Δ loss)": read(comparison_json, f"/table/{chosen_line}/forgetting/0"),
            f"{selective}: likelihood accuracy": read(
                comparison_json, f"/table/{chosen_line}/accuracy_likelihood/0"
            ),
            "full: likelihood accuracy": read(comparison_json, f"/table/{full_line}/accuracy_likelihood/0"),
        },
    )


def linguamap_cell(report_json: Path, scenario: str, lang: str, shots: int, mode: str) -> int:
    """Index of one (scenario, language, shots, mode) cell in a LinguaMap report's `cells` list."""
    import json

    cells = json.loads(Path(report_json).read_text())["cells"]
    for i, cell in enumerate(cells):
        if (cell["scenario"], cell["lang"], cell["shots"], cell["mode"]) == (scenario, lang, shots, mode):
            return i
    raise UserError(f"{report_json} has no cell for scenario {scenario}, {lang}, {shots} shots, {mode}")


def linguamap_bottlenecks(reports: dict[str, Path], langs: list[str], command: str = "") -> ClaimResult:
    """(h): per mixture and non-English language, the consistency bottleneck (other-language share,
    English query vs a query in the answer's language) and the transfer bottleneck (wrong term in the
    right language, scenario 2), by likelihood at 0 shots."""
    excess, details = [], {}
    for mixture, report in reports.items():
        for lang in langs:

            def share(scenario: str, outcome: str):
                index = linguamap_cell(report, scenario, lang, 0, "likelihood")
                return read(report, f"/cells/{index}/{outcome}")

            consistency, control = share("4", "other_language"), share("2", "other_language")
            excess.append(derive("difference", consistency, control))
            details[f"{mixture} {lang}: consistency (other language, en query)"] = consistency
            details[f"{mixture} {lang}: transfer (wrong term, right language)"] = share(
                "2", "wrong_expected_language"
            )
    mean, band = _mean_and_band(excess)
    return ClaimResult(
        key="h",
        claim="LinguaMap's two bottlenecks: consistency (right term, wrong language) and transfer",
        measure="other-language share with an English query minus with a query in the answer's language "
        f"(likelihood ranking, 0 shots), mean over {len(excess)} (mixture, language) cells",
        number=mean,
        uncertainty=band,
        verdict=_band_verdict(mean, band),
        rule=RULES["h"],
        command=command,
        sources=[str(r) for r in reports.values()],
        details=details,
    )


def model_quality(pretrain_summary: Path, clt_summary: Path) -> dict[str, Number]:
    """A model's and its CLT's own quality: held-out nats/char per language, FVU, L0, never-active
    share, replacement KL."""
    import json

    langs = sorted(json.loads(Path(pretrain_summary).read_text())["validation_nats_per_char"])
    quality = {
        f"nats/char {lang}": read(pretrain_summary, f"/validation_nats_per_char/{lang}") for lang in langs
    }
    quality["CLT mean FVU"] = read(clt_summary, "/heldout/all/mean_fvu")
    quality["CLT mean L0"] = read(clt_summary, "/heldout/all/mean_l0")
    never = json.loads(Path(clt_summary).read_text())["heldout"]["all"]["never_active_fraction"]
    quality["CLT never-active, worst layer"] = derive(
        "max", *(read(clt_summary, f"/heldout/all/never_active_fraction/{i}") for i in range(len(never)))
    )
    quality["replacement KL"] = read(clt_summary, "/replacement/all/kl")
    return quality


def released_quality(manifest: Path) -> dict[str, Number]:
    """`model_quality` of a released model, read from its MANIFEST.json: the same measures (the CLT's
    L0 only where the release recorded it; releases before 2026-12-06 did not), the replacement KL
    being the one measured on the released fp16 files."""
    import json

    metrics = json.loads(Path(manifest).read_text())["metrics"]
    langs = sorted(metrics["model"]["validation_nats_per_char"])
    nats = "/metrics/model/validation_nats_per_char"
    quality = {f"nats/char {lang}": read(manifest, f"{nats}/{lang}") for lang in langs}

    def per_layer(key: str) -> list[Number]:
        return [read(manifest, f"/metrics/clt/{key}/{i}") for i in range(len(metrics["clt"][key]))]

    quality["CLT mean FVU"] = derive("mean", *per_layer("heldout_fvu"))
    if metrics["clt"].get("heldout_l0"):
        quality["CLT mean L0"] = derive("mean", *per_layer("heldout_l0"))
    quality["CLT never-active, worst layer"] = derive("max", *per_layer("heldout_never_active_fraction"))
    quality["replacement KL"] = read(manifest, "/metrics/fp16/replacement_kl_released")
    return quality


def _label(source: Path, pointer: str) -> object:
    """A label (not a number of the report) from a stage's output."""
    import json

    from analysis.provenance import _resolve

    return _resolve(json.loads(Path(source).read_text()), pointer)


def _list(source: Path, pointer: str) -> list:
    return list(_label(source, pointer))
