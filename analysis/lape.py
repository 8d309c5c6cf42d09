"""Language Activation Probability Entropy (LAPE, Tang et al. 2024; METHODS §4) — for MLP neurons and,
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

from training.evaluate import mean_loss


@torch.no_grad()
def neuron_activation_probability(model, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
                                  ) -> Float[Tensor, "layer neuron lang"]:
    """Share of (non-BOS) tokens of each language on which each MLP neuron's post-GELU value is > 0."""
    device = next(model.parameters()).device
    blocks_mlp = [block.mlp for block in model.transformer.h]
    langs = list(blocks_by_lang)
    counts = torch.zeros(len(blocks_mlp), blocks_mlp[0].c_fc.nf, len(langs), dtype=torch.float64)
    current = {}

    def hook(layer):
        def fn(module, args, output):
            counts[layer, :, current["k"]] += (output[:, 1:] > 0).sum((0, 1)).double().cpu()
        return fn

    handles = [mlp.act.register_forward_hook(hook(layer)) for layer, mlp in enumerate(blocks_mlp)]
    tokens = torch.zeros(len(langs), dtype=torch.float64)
    try:
        for k, lang in enumerate(langs):
            current["k"] = k
            blocks = blocks_by_lang[lang]
            if len(blocks) == 0:
                raise ValueError(f"no text for language {lang!r}")
            for start in range(0, len(blocks), batch_size):
                batch = blocks[start: start + batch_size].to(device)
                model.transformer(input_ids=batch)
                tokens[k] += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        for handle in handles:
            handle.remove()
    return (counts / tokens).float()


def entropy(probabilities: Float[Tensor, "... lang"]) -> Float[Tensor, "..."]:
    """LAPE in nats over the language-normalised activation probabilities (NaN where a unit never fires)."""
    total = probabilities.sum(-1, keepdim=True)
    p = probabilities / total
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, float("nan")))


def lape_select(probabilities: Float[Tensor, "layer unit lang"], langs: list[str], top_fraction: float = 0.01,
                percentile: float = 0.95) -> dict:
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
    per_layer = {lang: np.bincount([l for l, _ in units], minlength=n_layers).tolist() for lang, units in by_lang.items()}
    return {"threshold": threshold, "top_fraction": top_fraction, "n_selected": len(selected),
            "selected": selected, "entropy": [float(h[l, u]) for l, u in selected],
            "by_lang": by_lang, "per_layer": per_layer,
            "selected_per_layer": np.bincount([l for l, _ in selected], minlength=n_layers).tolist()}


class DeactivateNeurons:
    """Context manager: the given (layer, neuron) MLP units output 0 after the activation function."""

    def __init__(self, model, neurons: list[tuple[int, int]]):
        self.mlps = [block.mlp for block in model.transformer.h]
        self.by_layer: dict[int, list[int]] = {}
        for layer, unit in neurons:
            if not (0 <= layer < len(self.mlps) and 0 <= unit < self.mlps[layer].c_fc.nf):
                raise ValueError(f"neuron ({layer}, {unit}) does not exist in this model")
            self.by_layer.setdefault(layer, []).append(unit)
        self._handles = []

    def __enter__(self):
        for layer, units in self.by_layer.items():
            index = torch.tensor(units)

            def zero(module, args, output, index=index):
                output = output.clone()
                output[..., index.to(output.device)] = 0
                return output
            self._handles.append(self.mlps[layer].act.register_forward_hook(zero))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def random_matched(neurons: list[tuple[int, int]], n_units: int, seed: int, exclude: set | None = None) -> list[tuple[int, int]]:
    """Random neurons with the same count per layer (excluding `exclude`)."""
    generator = np.random.default_rng(seed)
    exclude = exclude or set()
    out = []
    for layer, count in _counts(neurons).items():
        pool = [u for u in range(n_units) if (layer, u) not in exclude]
        out += [(layer, int(u)) for u in generator.choice(pool, size=count, replace=False)]
    return out


def _counts(neurons: list[tuple[int, int]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for layer, _ in neurons:
        counts[layer] = counts.get(layer, 0) + 1
    return dict(sorted(counts.items()))


def deactivation_matrix(model, neurons_by_lang: dict[str, list[tuple[int, int]]], eval_blocks: dict[str, Tensor],
                        seed: int = 0, batch_size: int = 16) -> dict:
    """Perplexity on each evaluated language with each language's neurons zeroed (and with random
    neurons of matched count per layer), as absolute and relative change from the intact model."""
    device = next(model.parameters()).device
    n_units = model.transformer.h[0].mlp.c_fc.nf
    eval_langs = list(eval_blocks)
    base = {lang: math.exp(mean_loss(model, eval_blocks[lang], batch_size, device)) for lang in eval_langs}
    all_selected = {unit for units in neurons_by_lang.values() for unit in units}
    result = {"base_ppl": base, "eval_langs": eval_langs, "lape": {}, "random": {}, "n_neurons": {}}
    for lang, neurons in neurons_by_lang.items():
        result["n_neurons"][lang] = len(neurons)
        for kind, units in (("lape", neurons), ("random", random_matched(neurons, n_units, seed, exclude=all_selected))):
            with DeactivateNeurons(model, units):
                ppl = {e: math.exp(mean_loss(model, eval_blocks[e], batch_size, device)) for e in eval_langs}
            result[kind][lang] = {e: {"ppl": ppl[e], "delta": ppl[e] - base[e], "relative": ppl[e] / base[e] - 1} for e in eval_langs}
    # diagonal dominance: for each deactivated language, is its own perplexity the one that rises most (relative)?
    result["diagonal_dominant"] = {
        lang: max(eval_langs, key=lambda e: result["lape"][lang][e]["relative"]) == lang
        for lang in neurons_by_lang if lang in eval_langs and neurons_by_lang[lang]}
    return result


def plot_lape(selection: dict, matrix: dict | None, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
