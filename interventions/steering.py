"""Steering the output language (Harrasse et al. 2025, docs/methods.md §5): methods, controls and their
evaluation.

A *plan* turns (source language, target language, strength) into a list of edits for `Intervener`:

- `clt`: suppress the source language's identity features (set to 0) and drive the target's
  (set to strength × their mean activation on target-language text), at every position — prompt and
  generated tokens alike.
- `random`: the same operations on random features of the same layers and count, each chosen with a
  decoder norm close to the language feature it replaces (control for "any edit of that size").
- `diffmean`: add strength × (mean residual on target text − mean on source text) after one layer
  (the layer holding most target features), the usual residual-steering baseline.
- `lape`: zero the source language's LAPE neurons and set the target's to strength × their mean
  post-GELU value on target text.
- `sae`: the `clt` recipe on the language latents of a residual SAE trained with sae-lens
  (interventions/sae.py), chosen by the same entropy / frequency rule as the CLT features.

`evaluate` generates greedy continuations of held-out source-language prompts under a plan and judges
each with CLD2: swap success (continuation in the target language, with a Wilson 95% interval),
source retention, unknown, the share of distinct tokens and "fluent success" (target language *and*
at least half the tokens distinct — CLD2 labels a repeated single token as that token's language);
and the fluency cost: the unsteered model's per-token loss on the steered
continuation (how natural the text is for the model) and the KL from the unsteered to the steered
next-token distributions over the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from interventions.hooks import FeatureEdit, Intervener, NeuronEdit, ResidualAdd
from interventions.sae import SAEEdit
from training import langid
from training.evaluate import distinct_share

METHODS = ("clt", "random", "diffmean", "lape", "sae")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class LanguageUnits:
    """What the plans need about each language, computed once per model (and CLT)."""

    features: dict[str, list[tuple[int, int]]]  # language-identity CLT features
    feature_means: dict[tuple[int, int], float]  # mean activation where active, on its language's text
    neurons: dict[str, list[tuple[int, int]]]  # LAPE neurons
    neuron_means: dict[tuple[int, int], float]  # mean post-GELU value on its language's text
    residual_means: dict[str, Tensor]  # [layer, d] mean residual after each layer on each language
    sae: object | None = None  # a sae-lens SAE on the residual after block `sae_layer`
    sae_layer: int | None = None
    sae_features: dict[str, list[int]] | None = None  # its language-identity latents
    sae_means: dict[int, float] | None = None  # mean value where active, on its language's text


@torch.no_grad()
def language_units(
    model,
    clt,
    blocks_by_lang: dict[str, Tensor],
    features: dict[str, list],
    neurons: dict[str, list],
    batch_size: int = 16,
) -> LanguageUnits:
    from analysis.firing import firing_counts
    from analysis.language_features import clt_features
    from analysis.lape import neuron_activations
    from analysis.residuals import residual_stream

    device = next(model.parameters()).device
    features = {lang: [tuple(unit) for unit in units] for lang, units in features.items()}  # JSON gives lists
    neurons = {lang: [tuple(unit) for unit in units] for lang, units in neurons.items()}
    feature_means, neuron_means, residual_means = {}, {}, {}
    for lang, blocks in blocks_by_lang.items():
        own = {lang: blocks}
        # The mean residual per token after each layer: a [layer, d, 1] "mean activation".
        residual = firing_counts(lambda ids: residual_stream(model, ids), own, batch_size, device)
        residual_means[lang] = residual.mean_activation()[..., 0].cpu()
        if neurons.get(lang):
            mean = firing_counts(
                lambda ids: neuron_activations(model, ids), own, batch_size, device
            ).mean_activation()
            neuron_means.update({unit: float(mean[unit[0], unit[1], 0]) for unit in neurons[lang]})
        if clt is not None and features.get(lang):
            strength = firing_counts(
                lambda ids: clt_features(model, clt, ids), own, batch_size, device
            ).strength()
            feature_means.update({unit: float(strength[unit[0], unit[1], 0]) for unit in features[lang]})
    return LanguageUnits(features, feature_means, neurons, neuron_means, residual_means)


def random_matched_features(
    clt, features: list[tuple[int, int]], exclude: set, seed: int
) -> list[tuple[int, int]]:
    """For each feature, a random feature of the same layer whose decoder norm is among the 10 closest."""
    generator = torch.Generator().manual_seed(seed)
    norms = clt.decoder_norms().detach().cpu()
    chosen = []
    for layer, feature in features:
        candidates = [
            f
            for f in torch.argsort((norms[layer] - norms[layer, feature]).abs()).tolist()
            if (layer, f) not in exclude and (layer, f) not in chosen
        ][:10]
        chosen.append((layer, candidates[int(torch.randint(len(candidates), (1,), generator=generator))]))
    return chosen


def plan(
    method: str,
    source: str,
    target: str,
    strength: float,
    units: LanguageUnits,
    clt=None,
    seed: int = 0,
    diffmean_layer: int | None = None,
) -> list:
    """The edits of one method at one strength (strength 0 = suppress the source only)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "sae":
        if units.sae is None:
            raise ValueError(
                "method 'sae' needs a residual SAE (steer.py --sae DIR, trained with scripts/train_sae.py)"
            )
        suppress, drive = units.sae_features.get(source, []), units.sae_features.get(target, [])
        if not suppress and not drive:
            raise ValueError(f"no SAE language latents for {source} or {target}")
        edits = [SAEEdit(units.sae_layer, units.sae, [z], "set", 0.0) for z in suppress]
        edits += [
            SAEEdit(units.sae_layer, units.sae, [z], "set", strength * units.sae_means[z]) for z in drive
        ]
        return edits
    if method in ("clt", "random"):
        suppress, drive = units.features.get(source, []), units.features.get(target, [])
        if not suppress and not drive:
            raise ValueError(f"no language features for {source} or {target}: nothing to steer with")
        values = [strength * units.feature_means.get(unit, 0.0) for unit in drive]
        if method == "random":
            exclude = {u for units_ in units.features.values() for u in units_}
            suppress = random_matched_features(clt, suppress, exclude, seed)
            drive = random_matched_features(clt, drive, exclude | set(suppress), seed + 1)
        edits = [FeatureEdit(layer, [feature], "set", 0.0) for layer, feature in suppress]
        edits += [
            FeatureEdit(layer, [feature], "set", value) for (layer, feature), value in zip(drive, values)
        ]
        return edits
    if method == "diffmean":
        n_layers = units.residual_means[target].shape[0]
        layer = (
            diffmean_layer
            if diffmean_layer is not None
            else _busiest_layer(units.features.get(target, []), default=n_layers // 2)
        )  # no features: the middle layer
        direction = units.residual_means[target][layer] - units.residual_means[source][layer]
        return [ResidualAdd(layer, direction, strength)]
    # lape
    suppress, drive = units.neurons.get(source, []), units.neurons.get(target, [])
    if not suppress and not drive:
        raise ValueError(f"no LAPE neurons for {source} or {target}")
    edits = [
        NeuronEdit(layer, [unit], "set", 0.0) for layer, unit in suppress if (layer, unit) not in set(drive)
    ]
    edits += [
        NeuronEdit(layer, [unit], "set", strength * units.neuron_means[(layer, unit)])
        for layer, unit in drive
    ]
    return edits


def _busiest_layer(features: list[tuple[int, int]], default: int) -> int:
    if not features:
        return default
    layers = [l for l, _ in features]
    return max(set(layers), key=lambda l: (layers.count(l), l))


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    clt,
    edits: list,
    prompts: Int[Tensor, "n pos"],
    source: str,
    target: str,
    new_tokens: int = 24,
    batch_size: int = 50,
) -> dict:
    """Generate greedy continuations under `edits` and judge them (see the module docstring)."""
    device = next(model.parameters()).device
    continuations, fluency, kls, distinct = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start : start + batch_size].to(device)
        clean_logits = model(input_ids=ids).logits
        with Intervener(model, clt, edits):
            steered_logits = model(input_ids=ids).logits
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
        kl = F.kl_div(
            steered_logits.log_softmax(-1), clean_logits.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        kls += kl[:, 1:].mean(1).tolist()  # KL(clean ‖ steered), mean over prompt positions after BOS
        # the unsteered model's loss on the steered continuation
        logits = model(input_ids=output).logits[:, ids.shape[1] - 1 : -1]
        loss = F.cross_entropy(logits.transpose(1, 2), output[:, ids.shape[1] :], reduction="none").mean(1)
        fluency += loss.tolist()
        generated = output[:, ids.shape[1] :].tolist()
        continuations += [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
        distinct += [distinct_share(row) for row in generated]
    n = len(continuations)
    return {
        **judge(continuations, source, target, distinct),
        "continuation_loss": float(sum(fluency) / n),
        "prompt_kl": float(sum(kls) / n),
    }


def judge(
    continuations: list[str],
    source: str,
    target: str,
    distinct: list[float] | None = None,
    min_distinct: float = 0.5,
) -> dict:
    """Swap success (judged target language) with its Wilson interval, source retention, unknown.

    CLD2 happily labels degenerate text ("в в в в …", "的的的…") as the language of its one token, so
    with `distinct` (share of distinct tokens in each continuation) also: `fluent_success`, the share
    judged the target language *and* with at least `min_distinct` distinct tokens."""
    if not continuations:
        raise ValueError("no continuations to judge")
    detected = langid.detect_many(continuations)
    n = len(detected)
    hits = sum(d == target for d in detected)
    low, high = wilson_interval(hits, n)
    result = {
        "n": n,
        "success": hits / n,
        "success_ci": [low, high],
        "retention": sum(d == source for d in detected) / n,
        "unknown": sum(d == langid.UNKNOWN for d in detected) / n,
        "examples": [{"continuation": c, "detected": d} for c, d in list(zip(continuations, detected))[:3]],
    }
    if distinct is not None:
        fluent = sum(d == target and x >= min_distinct for d, x in zip(detected, distinct))
        result.update(
            distinct=sum(distinct) / n,
            fluent_success=fluent / n,
            fluent_success_ci=list(wilson_interval(fluent, n)),
        )
    return result


@torch.no_grad()
def sae_language_latents(
    model,
    sae,
    layer: int,
    blocks_by_lang: dict[str, Tensor],
    max_entropy_bits: float = 0.8,
    min_frequency: float = 0.01,
    per_lang: int = 10,
) -> tuple[dict[str, list[int]], dict[int, float]]:
    """The SAE's language-identity latents (same rule as CLT features) and their mean value where active."""
    from analysis.language_features import language_features
    from analysis.residuals import residual_stream
    from interventions.sae import sae_activation_probability

    langs = list(blocks_by_lang)
    catalogue = language_features(
        sae_activation_probability(model, sae, layer, blocks_by_lang),
        langs,
        max_entropy_bits,
        min_frequency,
        per_lang,
    )
    latents = {lang: [f["feature"] for f in items] for lang, items in catalogue.items()}
    means = {}
    for lang, chosen in latents.items():
        if not chosen:
            continue
        z = sae.encode(residual_stream(model, blocks_by_lang[lang])[layer][:, 1:])[..., chosen]
        for i, latent in enumerate(chosen):
            values = z[..., i]
            means[latent] = float(values.sum() / (values > 0).sum().clamp(min=1))
    return latents, means
