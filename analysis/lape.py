"""Language Activation Probability Entropy (LAPE, Tang et al. 2024; docs/methods.md §4) — for MLP neurons and,
with the same functions, for CLT features.

    p_k(unit) = P(activation > 0 | text in language k)
    p̃_k = p_k / Σ_k' p_k'            LAPE = −Σ_k p̃_k log p̃_k   (low = language-specific)

Selection (the paper's): a unit is a candidate if some p_k exceeds the 95th percentile of all p values;
the lowest-entropy `top_fraction` (1%, also 5%) of *all* units among the candidates are selected; each
is assigned to every language whose p_k exceeds that percentile. Deactivation sets a neuron's post-GELU
value to zero; the check is the perplexity-change matrix (deactivated language × evaluated language),
which should be diagonal-dominant, against random neurons of matched count per layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analysis.firing import firing_share
from training import hook_points
from training.evaluate import mean_loss
from training.selection import random_matched


@torch.no_grad()
def neuron_activations(model, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "layer batch pos neuron"]:
    """Every layer's MLP neurons after the nonlinearity (`blocks.l.mlp.hook_post`)."""
    return hook_points.record_layers(model, "blocks.{l}.mlp.hook_post", input_ids=input_ids)


def neuron_activation_probability(
    model, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
) -> Float[Tensor, "layer neuron lang"]:
    """Share of (non-BOS) tokens of each language on which each MLP neuron's post-GELU value is > 0."""
    device = next(model.parameters()).device
    return firing_share(lambda ids: neuron_activations(model, ids), blocks_by_lang, batch_size, device)


def entropy(probabilities: Float[Tensor, "... lang"]) -> Float[Tensor, "..."]:
    """LAPE in nats over the language-normalised activation probabilities (NaN where a unit never fires)."""
    total = probabilities.sum(-1, keepdim=True)
    p = probabilities / total
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, float("nan")))


def lape_select(
    probabilities: Float[Tensor, "layer unit lang"],
    langs: list[str],
    top_fraction: float = 0.01,
    percentile: float = 0.95,
) -> dict:
    """The paper's selection on a [layer, unit, lang] activation-probability array."""
    if probabilities.shape[-1] != len(langs):
        raise ValueError(f"{probabilities.shape[-1]} languages in the probabilities, {len(langs)} names")
    n_layers, n_units, _ = probabilities.shape
    threshold = float(torch.quantile(probabilities.flatten().double(), percentile))
    h = entropy(probabilities)
    candidate = (probabilities > threshold).any(-1) & torch.isfinite(h)
    n_select = max(1, round(top_fraction * n_layers * n_units))
    scores = torch.where(candidate, h, torch.full_like(h, float("inf"))).flatten()
    order = torch.argsort(scores)[:n_select]
    order = order[torch.isfinite(scores[order])]
    selected = [(int(i) // n_units, int(i) % n_units) for i in order]
    by_lang: dict[str, list[tuple[int, int]]] = {lang: [] for lang in langs}
    for layer, unit in selected:
        for k, lang in enumerate(langs):
            if probabilities[layer, unit, k] > threshold:
                by_lang[lang].append((layer, unit))
    per_layer = {
        lang: np.bincount([l for l, _ in units], minlength=n_layers).tolist()
        for lang, units in by_lang.items()
    }
    return {
        "threshold": threshold,
        "top_fraction": top_fraction,
        "n_selected": len(selected),
        "selected": selected,
        "entropy": [float(h[l, u]) for l, u in selected],
        "by_lang": by_lang,
        "per_layer": per_layer,
        "selected_per_layer": np.bincount([l for l, _ in selected], minlength=n_layers).tolist(),
    }


def deactivate_neurons(model, neurons: list[tuple[int, int]]):
    """Context manager: the given (layer, neuron) MLP units output 0 after the activation function
    (LAPE's deactivation, as `NeuronEdit`s of the one intervention layer)."""
    from interventions.hooks import Intervener, NeuronEdit

    by_layer: dict[int, list[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(layer, []).append(unit)
    return Intervener(
        model, None, [NeuronEdit(layer, units, "set", 0.0) for layer, units in sorted(by_layer.items())]
    )


def deactivation_matrix(
    model,
    neurons_by_lang: dict[str, list[tuple[int, int]]],
    eval_blocks: dict[str, Tensor],
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Perplexity on each evaluated language with each language's neurons zeroed (and with random
    neurons of matched count per layer), as absolute and relative change from the intact model."""
    device = next(model.parameters()).device
    n_units = hook_points.adapter(model).d_mlp
    eval_langs = list(eval_blocks)
    base = {lang: math.exp(mean_loss(model, eval_blocks[lang], batch_size, device)) for lang in eval_langs}
    all_selected = {unit for units in neurons_by_lang.values() for unit in units}
    result = {"base_ppl": base, "eval_langs": eval_langs, "lape": {}, "random": {}, "n_neurons": {}}
    for lang, neurons in neurons_by_lang.items():
        result["n_neurons"][lang] = len(neurons)
        for kind, units in (
            ("lape", neurons),
            ("random", random_matched(neurons, n_units, seed, exclude=all_selected)),
        ):
            with deactivate_neurons(model, units):
                ppl = {e: math.exp(mean_loss(model, eval_blocks[e], batch_size, device)) for e in eval_langs}
            result[kind][lang] = {
                e: {"ppl": ppl[e], "delta": ppl[e] - base[e], "relative": ppl[e] / base[e] - 1}
                for e in eval_langs
            }
    # diagonal dominance: for each deactivated language, is its own perplexity the one that rises most
    # (relative)?
    result["diagonal_dominant"] = {
        lang: max(eval_langs, key=lambda e: result["lape"][lang][e]["relative"]) == lang
        for lang in neurons_by_lang
        if lang in eval_langs and neurons_by_lang[lang]
    }
    return result


def plot_lape(selection: dict, matrix: dict | None, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A model with no LAPE neuron in any language (e.g. a barely trained one) has no matrix to draw.
    if matrix and not any(matrix["n_neurons"][l] for l in matrix["lape"]):
        matrix = None
    n_panels = 1 + (2 if matrix else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
    ax = axes[0][0]
    layers = np.arange(len(selection["selected_per_layer"]))
    bottom = np.zeros(len(layers))
    for lang, counts in selection["per_layer"].items():
        ax.bar(layers, counts, bottom=bottom, label=lang)
        bottom += np.array(counts)
    ax.set_xlabel("layer")
    ax.set_ylabel("language neurons (a neuron may count for several languages)")
    ax.set_title(f"LAPE neurons, top {selection['top_fraction']:.0%}", fontsize=10)
    ax.set_xticks(layers)
    ax.legend(fontsize=7)
    if matrix:
        langs = [l for l in matrix["lape"] if matrix["n_neurons"][l]]
        for ax, kind in zip(axes[0][1:], ("lape", "random")):
            values = np.array([[matrix[kind][l][e]["relative"] for e in matrix["eval_langs"]] for l in langs])
            image = ax.imshow(values, cmap="Reds", vmin=0, vmax=max(np.nanmax(values), 1e-6))
            ax.set_xticks(range(len(matrix["eval_langs"])), matrix["eval_langs"])
            ax.set_yticks(range(len(langs)), langs)
            ax.set_xlabel("evaluated language")
            ax.set_ylabel("neurons zeroed")
            ax.set_title(f"relative perplexity change: {kind}", fontsize=10)
            for i in range(len(langs)):
                for j in range(len(matrix["eval_langs"])):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
