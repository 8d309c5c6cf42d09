"""Steering the output language (Harrasse et al. 2025, docs/methods.md §5, issue #13): methods, recipes,
controls and their evaluation.

A *plan* turns (method, source language, target language, strength) into a list of edits for
`Intervener`, plus whether attention is frozen on the prompt. Methods:

- a **feature strategy** (`entropy`, `output`, `attribution`, `aligned`; analysis/feature_selection.py):
  the source language's features are suppressed and the target's driven, as the `Recipe` says;
- `random-<strategy>`: the same recipe on random features of the same layers, each with a decoder norm
  close to the feature it replaces (the control for "any edit of that size");
- `oracle`: the best non-negative combination of ≤ k CLT features fitted to the pair's
  difference-of-means direction (an upper bound for feature steering), added at strength × its weights;
- `diffmean`: add strength × (mean residual on target text − mean on source text) after one layer;
- `lape`: source LAPE neurons zeroed, the target's set to strength × their mean value;
- `sae`: the recipe on the language latents of a residual SAE trained with sae-lens (interventions/sae.py).

A method may carry `@layer` (`output@3`, `diffmean@1`): only that layer's features / that layer's
residual — the success-by-layer diagnostic.

A **recipe** says how features are edited. Values for strength s (mean = the feature's mean activation
where active, on its own language's text):
    drive     set: a ← s·mean_T    add: a ← a + s·mean_T    scale: a ← s·a
    suppress  none    zero: a ← 0    negative: a ← −s·mean_S    scale: a ← −s·a
    positions all (every position after BOS, generated ones too) | prompt (prompt only) |
              last (last prompt position and every generated one)
    freeze_attention: attention patterns of the prompt pass replaced by the clean run's
    min_layer: only features of layers ≥ min_layer (negative: counted from the last layer)
`RECIPES` names the ones from the literature: `set` (this project's first recipe), `add` (the output-
effect probe of docs/methods.md §8), `arithmetic` ("language arithmetics", arXiv 2507.22608: source
−s × mean, target +s × mean, all positions) and `seed003` (Harrasse et al.'s code: multiplicative, last
two layers, source pushed negative, prompt positions, attention frozen).

`evaluate` generates continuations of held-out source-language prompts under a plan (greedy, or
nucleus-sampled several times per prompt) and judges each with CLD2: swap success (target language,
with a Wilson 95% interval) counted only for continuations that are not degenerate (distinct-token
share ≥ `min_distinct`, set by the caller from the unsteered continuations), plain CLD2 success, source
retention, unknown, the share of distinct tokens, and the fluency cost: the unsteered model's per-token
loss on the steered continuation and the KL from the unsteered to the steered next-token distributions
over the prompt. Given a token→language table (p(lang | token) from corpus counts,
analysis/token_language.py), also the share of continuations whose *first* generated token belongs to
the target (or source) language (p > 0.5: one language at most) — what a judgement of one or two
generated tokens, as in seed 003, would see; a recipe can turn the first token and lose the rest.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from analysis.feature_selection import STRATEGIES
from interventions.hooks import FeatureEdit, Intervener, NeuronEdit, ResidualAdd, Where
from interventions.sae import SAEEdit
from training import langid
from training.errors import UserError
from training.evaluate import distinct_share, next_token_kl
from training.sampling import generate_kwargs

BASE_METHODS = STRATEGIES + tuple(f"random-{s}" for s in STRATEGIES) + ("oracle", "diffmean", "lape", "sae")


@dataclass(frozen=True)
class Recipe:
    drive: str = "set"
    suppress: str = "zero"
    positions: str = "all"
    freeze_attention: bool = False
    min_layer: int = 0

    def __post_init__(self):
        for name, value, allowed in (
            ("drive", self.drive, ("set", "add", "scale")),
            ("suppress", self.suppress, ("none", "zero", "negative", "scale")),
            ("positions", self.positions, ("all", "prompt", "last")),
        ):
            if value not in allowed:
                raise UserError(f"recipe {name} must be one of {allowed}, got {value!r}")


RECIPES = {
    "set": Recipe(),
    "add": Recipe(drive="add", suppress="none"),
    "arithmetic": Recipe(drive="set", suppress="negative"),
    "seed003": Recipe(
        drive="scale", suppress="scale", positions="prompt", freeze_attention=True, min_layer=-2
    ),
}


@dataclass
class Plan:
    edits: list
    freeze_attention: bool = False


def parse_method(method: str) -> tuple[str, int | None]:
    """'output@3' → ('output', 3); 'diffmean' → ('diffmean', None)."""
    name, _, layer = method.partition("@")
    if name == "clt":  # the first recipe's name for the entropy rule
        name = "entropy"
    if name not in BASE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {BASE_METHODS} (optionally with @layer)")
    if layer and not layer.isdigit():
        raise ValueError(f"method {method!r}: the part after @ must be a layer number")
    return name, int(layer) if layer else None


def where(recipe: Recipe, prompt_len: int) -> Where:
    """The positions a recipe edits, for prompts of `prompt_len` tokens (BOS included, never edited)."""
    if recipe.positions == "prompt":
        return Where(positions=tuple(range(1, prompt_len)))
    if recipe.positions == "last":
        return Where(start=prompt_len - 1)
    return Where(start=1)


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

    feature_sets: dict[str, dict[str, list[tuple[int, int]]]]  # strategy → lang → CLT features
    feature_strength: dict[str, Tensor]  # lang → [layer, feature] mean activation where active on its text
    neurons: dict[str, list[tuple[int, int]]]  # LAPE neurons
    neuron_means: dict[tuple[int, int], float]  # mean post-GELU value on its language's text
    residual_means: dict[str, Tensor]  # [layer, d] mean residual after each layer on each language
    sae: object | None = None  # a sae-lens SAE on the residual after block `sae_layer`
    sae_layer: int | None = None
    sae_features: dict[str, list[int]] | None = None  # its language-identity latents
    sae_means: dict[int, float] | None = None  # mean value where active, on its language's text
    oracle_k: int = 10  # features in the oracle's fit
    token_language: dict[str, Tensor] | None = None  # lang → p(lang | token): first-token shares

    def feature_mean(self, lang: str, unit: tuple[int, int]) -> float:
        return float(self.feature_strength[lang][unit[0], unit[1]])


@torch.no_grad()
def language_units(
    model,
    clt,
    blocks_by_lang: dict[str, Tensor],
    feature_sets: dict[str, dict[str, list]],
    neurons: dict[str, list],
    batch_size: int = 16,
) -> LanguageUnits:
    from analysis.firing import firing_counts
    from analysis.language_features import clt_features
    from analysis.lape import neuron_activations
    from analysis.residuals import residual_means

    device = next(model.parameters()).device
    feature_sets = {  # JSON gives lists
        strategy: {lang: [tuple(unit) for unit in units] for lang, units in sets.items()}
        for strategy, sets in feature_sets.items()
    }
    neurons = {lang: [tuple(unit) for unit in units] for lang, units in neurons.items()}
    feature_strength, neuron_means = {}, {}
    for lang, blocks in blocks_by_lang.items():
        own = {lang: blocks}
        if neurons.get(lang):
            mean = firing_counts(
                lambda ids: neuron_activations(model, ids), own, batch_size, device
            ).mean_activation()
            neuron_means.update({unit: float(mean[unit[0], unit[1], 0]) for unit in neurons[lang]})
        if clt is not None:
            feature_strength[lang] = (
                firing_counts(lambda ids: clt_features(model, clt, ids), own, batch_size, device)
                .strength()[..., 0]
                .cpu()
            )
    means = residual_means(model, blocks_by_lang, batch_size)
    return LanguageUnits(feature_sets, feature_strength, neurons, neuron_means, means)


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
        if not candidates:
            raise ValueError(
                f"no random control for layer {layer}: every one of its {norms.shape[1]} features is "
                "selected or excluded (train a wider CLT)"
            )
        chosen.append((layer, candidates[int(torch.randint(len(candidates), (1,), generator=generator))]))
    return chosen


def _layer_filter(units: list, layer: int | None, min_layer: int, n_layers: int) -> list:
    lowest = min_layer if min_layer >= 0 else n_layers + min_layer
    return [u for u in units if u[0] >= lowest and (layer is None or u[0] == layer)]


def plan(
    method: str,
    source: str,
    target: str,
    strength: float,
    units: LanguageUnits,
    clt=None,
    recipe: Recipe = RECIPES["set"],
    prompt_len: int = 1,
    seed: int = 0,
    diffmean_layer: int | None = None,
) -> Plan:
    """The edits of one method at one strength (module docstring)."""
    name, layer = parse_method(method)
    at = where(recipe, prompt_len)
    n_layers = next(iter(units.residual_means.values())).shape[0]
    if name == "diffmean":
        layer = layer if layer is not None else _diffmean_layer(units, target, diffmean_layer, n_layers)
        direction = units.residual_means[target][layer] - units.residual_means[source][layer]
        return Plan([ResidualAdd(layer, direction, strength, at)], recipe.freeze_attention)
    if name == "lape":
        suppress, drive = units.neurons.get(source, []), units.neurons.get(target, [])
        if not suppress and not drive:
            raise ValueError(f"no LAPE neurons for {source} or {target}")
        edits = [NeuronEdit(l, [u], "set", 0.0, at) for l, u in suppress if (l, u) not in set(drive)]
        edits += [NeuronEdit(l, [u], "set", strength * units.neuron_means[(l, u)], at) for l, u in drive]
        return Plan(edits, recipe.freeze_attention)
    if name == "sae":
        if units.sae is None:
            raise ValueError(
                "method 'sae' needs a residual SAE (steer.py --sae DIR, trained with scripts/train_sae.py)"
            )
        suppress, drive = units.sae_features.get(source, []), units.sae_features.get(target, [])
        if not suppress and not drive:
            raise ValueError(f"no SAE language latents for {source} or {target}")
        edits = [
            SAEEdit(units.sae_layer, units.sae, [z], *_suppression(recipe, strength, units.sae_means[z]))
            for z in suppress
        ]
        edits += [
            SAEEdit(units.sae_layer, units.sae, [z], *_drive(recipe, strength, units.sae_means[z]))
            for z in drive
        ]
        return Plan([replace(e, where=at) for e in edits], recipe.freeze_attention)
    if name == "oracle":
        from analysis.feature_selection import oracle_features

        layer = layer if layer is not None else _diffmean_layer(units, target, diffmean_layer, n_layers)
        direction = units.residual_means[target][layer] - units.residual_means[source][layer]
        chosen, weights = oracle_features(clt, direction, layer, units.oracle_k)
        return Plan(
            [FeatureEdit(l, [f], "add", strength * w, at) for (l, f), w in zip(chosen, weights)],
            recipe.freeze_attention,
        )
    # a feature strategy or its random control
    strategy = name.removeprefix("random-")
    if strategy not in units.feature_sets:
        raise ValueError(f"no '{strategy}' feature sets: run locate_language.py with that strategy")
    sets = units.feature_sets[strategy]
    suppress = _layer_filter(sets.get(source, []), layer, recipe.min_layer, n_layers)
    drive = _layer_filter(sets.get(target, []), layer, recipe.min_layer, n_layers)
    if recipe.suppress == "none":
        suppress = []
    if not suppress and not drive:
        raise ValueError(f"no {strategy} features for {source} or {target} here: nothing to steer with")
    suppress_values = [_suppression(recipe, strength, units.feature_mean(source, u)) for u in suppress]
    drive_values = [_drive(recipe, strength, units.feature_mean(target, u)) for u in drive]
    if name.startswith("random-"):
        exclude = {u for sets_ in units.feature_sets.values() for items in sets_.values() for u in items}
        suppress = random_matched_features(clt, suppress, exclude, seed)
        drive = random_matched_features(clt, drive, exclude | set(suppress), seed + 1)
    edits = [FeatureEdit(l, [f], mode, value, at) for (l, f), (mode, value) in zip(suppress, suppress_values)]
    edits += [FeatureEdit(l, [f], mode, value, at) for (l, f), (mode, value) in zip(drive, drive_values)]
    return Plan(edits, recipe.freeze_attention)


def _drive(recipe: Recipe, strength: float, mean: float) -> tuple[str, float]:
    if recipe.drive == "set":
        return "set", strength * mean
    if recipe.drive == "add":
        return "add", strength * mean
    return "scale", strength


def _suppression(recipe: Recipe, strength: float, mean: float) -> tuple[str, float]:
    if recipe.suppress == "negative":
        return "set", -strength * mean
    if recipe.suppress == "scale":
        return "scale", -strength
    return "set", 0.0  # zero


def _diffmean_layer(units: LanguageUnits, target: str, layer: int | None, n_layers: int) -> int:
    """The given layer, else the layer holding most of the target's entropy features, else the middle."""
    if layer is not None:
        return layer
    features = units.feature_sets.get("entropy", {}).get(target, [])
    if not features:
        return n_layers // 2
    layers = [l for l, _ in features]
    return max(set(layers), key=lambda l: (layers.count(l), l))


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    clt,
    plan_: Plan | list,
    prompts: Int[Tensor, "n pos"],
    source: str,
    target: str,
    new_tokens: int = 24,
    batch_size: int = 50,
    decoding: str = "greedy",
    samples: int = 3,
    seed: int = 0,
    min_distinct: float | None = 0.5,
    token_language: dict[str, Float[Tensor, " vocab"]] | None = None,
) -> dict:
    """Generate continuations under a plan and judge them (see the module docstring).

    decoding: "greedy" (one continuation per prompt) or "sampled" (`samples` per prompt with the
    project's nucleus sampler, seeded). token_language: lang → p(lang | token) over the vocabulary, for
    the first-token shares (needs the source's and the target's rows)."""
    from interventions.hooks import freeze_attention, record_patterns

    if decoding not in ("greedy", "sampled"):
        raise ValueError(f"decoding must be greedy or sampled, got {decoding!r}")
    plan_ = plan_ if isinstance(plan_, Plan) else Plan(list(plan_))
    if prompts.shape[1] + new_tokens > model.config.n_positions:
        raise UserError(
            f"prompts of {prompts.shape[1]} tokens and {new_tokens} new tokens exceed the model's context "
            f"of {model.config.n_positions}: use shorter prompts or fewer new tokens"
        )
    device = next(model.parameters()).device
    sampling = generate_kwargs(sampled=decoding == "sampled")
    rounds = samples if decoding == "sampled" else 1
    rng_state = torch.get_rng_state()
    continuations, fluency, kls, distinct, first_tokens = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start : start + batch_size].to(device)
        clean_logits = model(input_ids=ids).logits
        frozen = None
        if plan_.freeze_attention:
            patterns = record_patterns(model, ids)
            frozen = lambda: freeze_attention(model, patterns, prompt_only=True)  # noqa: E731
        with Intervener(model, clt, plan_.edits):
            with frozen() if frozen else nullcontext():
                steered_logits = model(input_ids=ids).logits
            outputs = []
            for round_ in range(rounds):
                torch.manual_seed(seed * 1000 + round_)
                with frozen() if frozen else nullcontext():
                    outputs.append(
                        model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=new_tokens,
                            **sampling,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=None,
                        )
                    )
        kl = next_token_kl(clean_logits, steered_logits)
        kls += kl[:, 1:].mean(1).tolist()  # KL(clean ‖ steered), mean over prompt positions after BOS
        for output in outputs:
            # the unsteered model's loss on the steered continuation
            logits = model(input_ids=output).logits[:, ids.shape[1] - 1 : -1]
            loss = F.cross_entropy(logits.transpose(1, 2), output[:, ids.shape[1] :], reduction="none").mean(
                1
            )
            fluency += loss.tolist()
            generated = output[:, ids.shape[1] :].tolist()
            continuations += [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
            distinct += [distinct_share(row) for row in generated]
            first_tokens += [row[0] for row in generated]
    torch.set_rng_state(rng_state)
    n = len(continuations)
    result = {
        **judge(continuations, source, target, distinct, min_distinct),
        "decoding": decoding,
        "continuation_loss": float(sum(fluency) / n),
        "prompt_kl": float(sum(kls) / len(kls)),
    }
    if token_language is not None:
        first = torch.tensor(first_tokens)
        for name, lang in (("first_token_target", target), ("first_token_source", source)):
            result[name] = float((token_language[lang][first] > 0.5).float().mean())
    return result


def judge(
    continuations: list[str],
    source: str,
    target: str,
    distinct: list[float] | None = None,
    min_distinct: float | None = 0.5,
) -> dict:
    """Swap success (judged target language) with its Wilson interval, source retention, unknown.

    CLD2 happily labels degenerate text ("в в в в …", "的的的…") as the language of its one token, so
    with `distinct` (share of distinct tokens in each continuation) also: `fluent_success`, the share
    judged the target language *and* with at least `min_distinct` distinct tokens (None: 0.8 × the mean
    over these continuations — how the unsteered baseline sets the bar for its pair)."""
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
        if min_distinct is None:
            min_distinct = 0.8 * sum(distinct) / max(1, len(distinct))
        fluent = sum(d == target and x >= min_distinct for d, x in zip(detected, distinct))
        result.update(
            min_distinct=min_distinct,
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
