"""Which CLT features are a language's? Four selection strategies behind one interface (issue #13).

Each strategy returns, per language, a ranked list of `{"layer", "feature", "score", ...}` — the
feature sets that steering drives (target language) and suppresses (source language):

- `entropy`: the language-identity rule (analysis/language_features.py): low entropy of the language
  mix, most frequent first. Chosen by *where a feature fires*, not by what it does.
- `output`: what a feature *writes*: its decoder rows summed over the layers it writes to, through the
  final LayerNorm (centring, weight, and the mean 1/σ measured on held-out text, so scores are in
  logits) and W_U, scored against each language's read-out direction (`language_readouts`) — the
  target-vs-other-languages margin of analysis/output_features.py.
- `attribution`: what a feature *does in context*: on held-out prompts of language L, an attribution
  graph (attribution/attribute.py) with L's read-out direction as its target; a feature's score is its
  direct attribution into that direction summed over positions, averaged over prompts (0 where it is
  not active), i.e. mean attribution when active × the share of prompts where it is active.
- `aligned`: the bridge to the strong residual baseline: features whose cumulative write into the
  residual after layer k (decoder rows of layers l…k summed) has the largest cosine with the
  difference-of-means direction of L at that layer (mean residual on L text − mean over the other
  languages), best layer k ≥ l.

A language's read-out direction is built from many words: W_Uᵀ (w_L − mean_{L'≠L} w_L'), with w_L
uniform over the tokens specific to L in translated paragraphs (output_features.language_token_weights)
— Harrasse et al.'s `W_U[word in L] − mean over its translations`, averaged over a vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from analysis.output_features import language_readouts, output_scores, rank_output_features
from clt.export import folded_weights
from clt.model import CrossLayerTranscoder

STRATEGIES = ("entropy", "output", "attribution", "aligned")


@torch.no_grad()
def mean_inverse_ln_scale(model, blocks: Int[Tensor, "n pos"], batch_size: int = 16) -> float:
    """Mean over held-out tokens (BOS excluded) of ln_f's 1/σ: the frozen scale that turns a residual
    direction into logits."""
    from analysis.residuals import residual_stream

    device = next(model.parameters()).device
    eps = model.transformer.ln_f.eps
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        final = residual_stream(model, blocks[start : start + batch_size].to(device))[-1][:, 1:]
        inverse = (final.var(-1, unbiased=False) + eps).rsqrt()
        total, count = total + float(inverse.sum()), count + inverse.numel()
    if count == 0:
        raise ValueError("no tokens to measure ln_f's scale on")
    return total / count


def select_output(
    model,
    clt: CrossLayerTranscoder,
    token_weights: Float[Tensor, "vocab lang"],
    langs: list[str],
    per_lang: int,
    inverse_scale: float = 1.0,
) -> dict[str, list[dict]]:
    return rank_output_features(output_scores(model, clt, token_weights) * inverse_scale, langs, per_lang)


@torch.no_grad()
def attribution_scores(
    model,
    clt: CrossLayerTranscoder,
    prompts: Int[Tensor, "n pos"],
    readout: Float[Tensor, " d_model"],
    label: str = "language",
    progress: bool = False,
) -> tuple[Float[Tensor, "layer feature"], Float[Tensor, "layer feature"]]:
    """Mean over prompts of each feature's direct attribution into `readout` at the last position
    (summed over the positions where it is active; 0 where it is not), and the share of prompts
    where it is active."""
    from attribution.attribute import attribute
    from attribution.targets import direction_target

    L, F = clt.config.n_layers, clt.config.n_features
    total = torch.zeros(L, F, dtype=torch.float64)
    present = torch.zeros(L, F, dtype=torch.float64)
    target = direction_target(label, readout)
    for tokens in tqdm(prompts, desc=f"attribution {label}", disable=not progress, unit="prompt"):
        scores, active = graph_feature_scores(attribute(model, clt, tokens, [target], targets_only=True), F)
        total += scores
        present += active
    n = max(1, len(prompts))
    return (total / n).float(), (present / n).float()


def graph_feature_scores(
    graph, n_features: int, target: int = 0
) -> tuple[Float[Tensor, "layer feature"], Float[Tensor, "layer feature"]]:
    """One graph's direct attribution of every feature into target `target`, summed over the positions
    where the feature is active, and a 0/1 map of the features active anywhere."""
    L = graph.n_layers
    row = graph.adjacency[graph.target_start + target, : graph.n_features].double()
    flat = graph.active_features[:, 0] * n_features + graph.active_features[:, 2]
    scores = torch.zeros(L * n_features, dtype=torch.float64).index_add_(0, flat, row)
    active = torch.zeros(L * n_features, dtype=torch.float64)
    active[flat.unique()] = 1.0
    return scores.view(L, n_features), active.view(L, n_features)


def select_attribution(
    model,
    clt: CrossLayerTranscoder,
    prompts_by_lang: dict[str, Int[Tensor, "n pos"]],
    readouts: Float[Tensor, "lang d_model"],
    langs: list[str],
    per_lang: int,
    progress: bool = False,
) -> dict[str, list[dict]]:
    ranked = {}
    for k, lang in enumerate(langs):
        scores, frequency = attribution_scores(
            model, clt, prompts_by_lang[lang], readouts[k], f"lang:{lang}", progress
        )
        ranked[lang] = _top_positive(
            scores,
            per_lang,
            extra=lambda layer, feature: {"prompt_frequency": float(frequency[layer, feature])},
        )
    return ranked


def cumulative_writes(clt: CrossLayerTranscoder) -> list[Float[Tensor, "feature layer d_model"]]:
    """Per source layer l: what each feature adds to the residual after every layer k (model units),
    Σ_{j=l..k} of its decoder rows; rows for k < l are zero."""
    L = clt.config.n_layers
    out = []
    for layer, W in enumerate(folded_weights(clt)["W_dec"]):  # [feature, targets, d]
        cumulative = W.cumsum(1)
        full = torch.zeros(W.shape[0], L, W.shape[2])
        for k in range(layer, L):
            full[:, k] = cumulative[:, min(k - layer, W.shape[1] - 1)]
        out.append(full)
    return out


def diffmean_directions(
    residual_means: dict[str, Float[Tensor, "layer d_model"]], langs: list[str]
) -> Float[Tensor, "lang layer d_model"]:
    """Per language and layer: mean residual on its text − mean of the other languages' means."""
    means = torch.stack([residual_means[lang] for lang in langs])  # [lang, layer, d]
    others = (means.sum(0, keepdim=True) - means) / max(1, len(langs) - 1)
    return means - others


def select_aligned(
    clt: CrossLayerTranscoder,
    directions: Float[Tensor, "lang layer d_model"],
    langs: list[str],
    per_lang: int,
) -> dict[str, list[dict]]:
    writes = cumulative_writes(clt)
    L, F = clt.config.n_layers, clt.config.n_features
    ranked = {}
    for k, lang in enumerate(langs):
        unit = directions[k] / directions[k].norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [layer, d]
        scores, best_layer = torch.full((L, F), -2.0), torch.zeros(L, F, dtype=torch.long)
        for layer, W in enumerate(writes):
            cosine = torch.einsum("fkd,kd->fk", W, unit) / W.norm(dim=-1).clamp(min=1e-12)
            cosine[:, :layer] = -2.0  # a feature cannot write before its own layer
            scores[layer], best_layer[layer] = cosine.max(1)
        ranked[lang] = _top_positive(
            scores, per_lang, extra=lambda l, f: {"best_layer": int(best_layer[l, f])}
        )
    return ranked


def _top_positive(scores: Float[Tensor, "layer feature"], per_lang: int, extra=None) -> list[dict]:
    n_features = scores.shape[1]
    top = scores.flatten().topk(min(per_lang, scores.numel()))
    out = []
    for value, index in zip(top.values.tolist(), top.indices.tolist()):
        if value <= 0:
            break
        layer, feature = divmod(index, n_features)
        out.append(
            {"layer": layer, "feature": feature, "score": value, **(extra(layer, feature) if extra else {})}
        )
    return out


def units(ranked: dict[str, list[dict]]) -> dict[str, list[list[int]]]:
    """The located.json form of a strategy's sets: {lang: [[layer, feature], ...]}."""
    return {lang: [[item["layer"], item["feature"]] for item in items] for lang, items in ranked.items()}


@dataclass
class SelectionData:
    """The text each strategy reads — none of it from steering's evaluation prompts."""

    train_blocks: dict[str, Tensor]  # entropy: firing frequencies per language
    translated_texts: dict[str, list[str]]  # output / attribution: each language's specific tokens
    validation_blocks: dict[str, Tensor]  # ln_f's mean scale; residual means for `aligned`
    attribution_prompts: dict[str, Tensor]  # attribution: held-out prompts [n, BOS + tokens]


class FeatureSelector:
    """Runs any strategy on one model + CLT, computing what strategies share only once."""

    def __init__(
        self,
        model,
        clt: CrossLayerTranscoder,
        tokenizer,
        data: SelectionData,
        langs: list[str],
        token_min_share: float = 0.8,
        token_min_count: int = 3,
    ):
        self.model, self.clt, self.tokenizer, self.data, self.langs = model, clt, tokenizer, data, list(langs)
        self.token_rule = {"min_share": token_min_share, "min_count": token_min_count}

    @cached_property
    def firing_probabilities(self) -> Float[Tensor, "layer feature lang"]:
        from analysis.language_features import feature_activation_probability

        return feature_activation_probability(
            self.model, self.clt, {l: self.data.train_blocks[l] for l in self.langs}
        )

    @cached_property
    def token_weights(self) -> Float[Tensor, "vocab lang"]:
        from analysis.output_features import language_token_weights

        return language_token_weights(
            self.tokenizer, {l: self.data.translated_texts[l] for l in self.langs}, **self.token_rule
        )

    @cached_property
    def readouts(self) -> Float[Tensor, "lang d_model"]:
        return language_readouts(self.model, self.token_weights)

    @cached_property
    def inverse_scale(self) -> float:
        return mean_inverse_ln_scale(
            self.model, torch.cat([self.data.validation_blocks[l] for l in self.langs])
        )

    @cached_property
    def residual_means(self) -> dict[str, Tensor]:
        from analysis.residuals import residual_means

        return residual_means(self.model, {l: self.data.validation_blocks[l] for l in self.langs})

    def select(self, strategy: str, per_lang: int = 10, progress: bool = False, **entropy_rule) -> dict:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown selection strategy {strategy!r}; choose from {STRATEGIES}")
        if strategy == "entropy":
            from analysis.language_features import language_features

            ranked = language_features(
                self.firing_probabilities, self.langs, per_lang=per_lang, **entropy_rule
            )
            for items in ranked.values():
                for f in items:
                    f["score"] = f["frequency"]  # the rule ranks by in-language frequency
            return ranked
        if strategy == "output":
            return select_output(
                self.model, self.clt, self.token_weights, self.langs, per_lang, self.inverse_scale
            )
        if strategy == "attribution":
            return select_attribution(
                self.model,
                self.clt,
                self.data.attribution_prompts,
                self.readouts,
                self.langs,
                per_lang,
                progress,
            )
        return select_aligned(
            self.clt, diffmean_directions(self.residual_means, self.langs), self.langs, per_lang
        )

    def describe(self, ranked: dict[str, list[dict]], contexts_from: Tensor, n_contexts: int = 3) -> None:
        """Adds to every selected feature what makes it inspectable: its firing frequency in every
        language, its top-activating contexts in `contexts_from` and the tokens it promotes."""
        from analysis.language_features import promoted_tokens, top_contexts

        chosen = sorted({(f["layer"], f["feature"]) for items in ranked.values() for f in items})
        contexts = top_contexts(self.model, self.clt, self.tokenizer, contexts_from, chosen, k=n_contexts)
        promotes = promoted_tokens(self.model, self.clt, self.tokenizer, chosen)
        probabilities = self.firing_probabilities
        for items in ranked.values():
            for f in items:
                key = (f["layer"], f["feature"])
                f["frequency_by_lang"] = {
                    lang: float(probabilities[key[0], key[1], k]) for k, lang in enumerate(self.langs)
                }
                f["contexts"], f["promotes"] = contexts[key], promotes[key]


# --- diagnostics: how much of the difference-of-means direction features can express ------------------


def writes_at(
    clt: CrossLayerTranscoder, layer: int
) -> tuple[Float[Tensor, "atom d_model"], list[tuple[int, int]]]:
    """Every feature of layers ≤ `layer`, as what it adds to the residual after `layer` per unit of
    activation (its cumulative write), with its (layer, feature) name."""
    writes = cumulative_writes(clt)
    atoms = torch.cat([writes[l][:, layer] for l in range(layer + 1)])
    names = [(l, f) for l in range(layer + 1) for f in range(clt.config.n_features)]
    return atoms, names


def nonnegative_pursuit(
    atoms: Float[Tensor, "atom d"],
    target: Float[Tensor, " d"],
    k: int,
    sweeps: int = 500,
    tolerance: float = 1e-6,
) -> tuple[list[int], Float[Tensor, " chosen"]]:
    """The best non-negative combination of at most k atoms fitted to `target` (least squares):
    greedy selection of the atom most positively correlated with the residual, then the non-negative
    least-squares weights of the chosen atoms by cyclic coordinate descent (exact for this convex
    problem at convergence); stops early once the residual is below `tolerance` × ‖target‖. Atoms that
    end with weight 0 are dropped."""
    norms = atoms.norm(dim=1).clamp(min=1e-12)
    chosen: list[int] = []
    weights = torch.zeros(0, dtype=torch.float64)
    residual = target.double()
    for _ in range(k):
        if residual.norm() <= tolerance * target.double().norm():  # already rebuilt: stop adding atoms
            break
        correlation = (atoms.double() @ residual) / norms.double()
        if chosen:
            correlation[chosen] = -math.inf
        best = int(correlation.argmax())
        if correlation[best] <= 0:
            break
        chosen.append(best)
        weights = _nnls(
            atoms[chosen].double(), target.double(), torch.cat([weights, weights.new_zeros(1)]), sweeps
        )
        residual = target.double() - weights @ atoms[chosen].double()
    keep = [i for i, w in enumerate(weights.tolist()) if w > 0]
    return [chosen[i] for i in keep], weights[keep].float()


def _nnls(A: Tensor, b: Tensor, start: Tensor, sweeps: int) -> Tensor:
    gram, rhs = A @ A.T, A @ b
    x = start.clone()
    for _ in range(sweeps):
        previous = x.clone()
        for i in range(len(x)):
            if gram[i, i] > 0:
                x[i] = max(0.0, float(x[i] + (rhs[i] - gram[i] @ x) / gram[i, i]))
        if (x - previous).abs().max() <= 1e-12 * (1 + float(x.abs().max())):
            break
    return x


def oracle_features(
    clt: CrossLayerTranscoder, direction: Float[Tensor, " d_model"], layer: int, k: int
) -> tuple[list[tuple[int, int]], list[float]]:
    """Features (of layers ≤ `layer`) and non-negative activations whose writes best rebuild
    `direction` in the residual after `layer`."""
    atoms, names = writes_at(clt, layer)
    chosen, weights = nonnegative_pursuit(atoms, direction.float(), k)
    return [names[i] for i in chosen], weights.tolist()


def span_share(
    clt: CrossLayerTranscoder,
    features: list[tuple[int, int]],
    direction: Float[Tensor, " d_model"],
    layer: int,
) -> float:
    """Share of ‖direction‖² inside the span of the given features' writes into the residual after
    `layer` (features above `layer` write nothing there): ‖P d‖² / ‖d‖²."""
    writes = cumulative_writes(clt)
    rows = [writes[l][f, layer] for l, f in features if l <= layer]
    d = direction.double()
    if not rows or not d.norm() > 0:
        return 0.0
    U, S, _ = torch.linalg.svd(torch.stack(rows).double().T, full_matrices=False)  # [d, r]
    basis = U[:, S > S.max() * 1e-10]  # an orthonormal basis of the span (dependent writes add nothing)
    projection = basis @ (basis.T @ d)
    return float(projection.norm() ** 2 / d.norm() ** 2)
