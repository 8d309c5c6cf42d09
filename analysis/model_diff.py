"""Diff two models of the same architecture through one shared CLT (docs/methods.md §7, Harrasse et al. 2025).

Typical pair: a model before and after fine-tuning, with the CLT trained on the *before* model; or two
pretraining mixtures. Every measure runs both models on the same token blocks:

- `clt_statistics`: per layer, feature and language, how often each CLT feature fires and how strongly
  (mean activation when active), plus the CLT's reconstruction quality (FVU per layer) on each model —
  a CLT drifts off a model it was not trained on, and all feature-level differences must be read with
  that drift in mind;
- `identity_features` / `brightening`: per language and layer, the features most specific to the
  language on the before model (frequency on it minus the highest frequency on any other language),
  and how their frequency and strength change (ratio after / before);
- `graph_differences`: attribution graphs of the same prompts on both models (`attribution/`): edge
  strength per (source layer → target layer), how much the edges change, and the strength of
  middle-layer cross-lingual clusters (features found in the graphs of ≥ 2 translations of a prompt);
- `fertility_and_early_features`: tokens per word per language vs layer-0 feature activity;
- `lens_kl`: KL between the two models' logit-lens distributions after every layer.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from analysis.firing import FiringCounter
from analysis.residuals import lens_logits, residual_stream
from clt.model import CrossLayerTranscoder
from clt.recorder import MLPActivationRecorder
from training.errors import ModelMismatch
from training.evaluate import next_token_kl


def check_same_architecture(before, after, clt: CrossLayerTranscoder) -> None:
    keys = ("n_layer", "n_embd", "n_inner", "vocab_size", "n_positions")
    differing = [k for k in keys if getattr(before.config, k) != getattr(after.config, k)]
    if differing:
        raise ModelMismatch(
            f"the models differ in {differing}: a diff through one CLT needs the same architecture"
        )
    if clt.config.n_layers != before.config.n_layer or clt.config.d_model != before.config.n_embd:
        raise ModelMismatch(
            f"the CLT is for {clt.config.n_layers} layers × {clt.config.d_model}, the models have "
            f"{before.config.n_layer} × {before.config.n_embd}"
        )


# ---------------------------------------------------------------------------------------------
# CLT features on each model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def clt_statistics(
    model, clt: CrossLayerTranscoder, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
) -> dict:
    """Feature frequency and strength per [layer, feature, lang], FVU per layer and language, L0."""
    device = next(model.parameters()).device
    langs = list(blocks_by_lang)
    L, n_feat = clt.config.n_layers, clt.config.n_features
    counter = FiringCounter(L, n_feat, langs)
    fvu, l0 = {}, {}
    for k, lang in enumerate(langs):
        blocks = blocks_by_lang[lang]
        if len(blocks) == 0:
            raise ValueError(f"no text for language {lang!r}")
        tokens = 0
        sq_err = torch.zeros(L, dtype=torch.float64)
        sum_y = torch.zeros(L, clt.config.d_model, dtype=torch.float64)
        sum_y2 = torch.zeros(L, dtype=torch.float64)
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size].to(device)
            with MLPActivationRecorder(model) as recorder:
                model.transformer(input_ids=batch)
            # BOS excluded everywhere, as in training and location.
            x = torch.stack([recorder.inputs[layer][:, 1:] for layer in range(L)], dim=2).flatten(0, 1)
            y = torch.stack([recorder.outputs[layer][:, 1:] for layer in range(L)], dim=2).flatten(0, 1)
            x = x * clt.input_scale[None, :, None]
            y = (y * clt.output_scale[None, :, None]).double()
            y_hat, acts, _ = clt(x)
            counter.add(lang, rearrange(acts, "t l f -> l t f"))
            sq_err += (y - y_hat.double()).pow(2).sum((0, 2)).cpu()
            sum_y += y.sum(0).cpu()
            sum_y2 += y.pow(2).sum((0, 2)).cpu()
            tokens += x.shape[0]
        variance = sum_y2 - sum_y.pow(2).sum(-1) / tokens
        fvu[lang] = (sq_err / variance.clamp_min(1e-12)).tolist()
        l0[lang] = (counter.fired[:, :, k].sum(1) / tokens).tolist()
    return {
        "langs": langs,
        "frequency": counter.frequency(),
        "strength": counter.strength(),
        "fvu": fvu,
        "l0": l0,
    }


def identity_features(
    frequency: Float[Tensor, "layer feature lang"], langs: list[str], per_layer: int = 5
) -> dict[str, dict[int, list[int]]]:
    """Per language and layer: the `per_layer` features with the largest positive specificity
    (frequency on the language minus the largest frequency on any other language)."""
    out: dict[str, dict[int, list[int]]] = {}
    for k, lang in enumerate(langs):
        others = torch.cat([frequency[..., :k], frequency[..., k + 1 :]], dim=-1)
        specificity = frequency[..., k] - (others.max(-1).values if others.shape[-1] else 0)
        out[lang] = {}
        for layer in range(frequency.shape[0]):
            values, indices = specificity[layer].topk(min(per_layer, specificity.shape[1]))
            out[lang][layer] = [int(i) for v, i in zip(values.tolist(), indices.tolist()) if v > 0]
    return out


def brightening(before: dict, after: dict, features: dict[str, dict[int, list[int]]]) -> dict:
    """Per language and layer: mean frequency, strength (activation when active) and mass (mean
    activation per token) of its identity features on its own text, before and after, and log2
    ratios (> 0 = brighter after)."""
    langs = before["langs"]
    out: dict[str, dict[str, dict]] = {}
    for lang, by_layer in features.items():
        k = langs.index(lang)
        out[lang] = {}
        for layer, indices in by_layer.items():
            if not indices:
                continue
            entry = {}
            for name in ("frequency", "strength", "mass"):
                values = {}
                for when, stats in (("before", before), ("after", after)):
                    freq, strength = (
                        stats["frequency"][layer, indices, k],
                        stats["strength"][layer, indices, k],
                    )
                    # mass = frequency × strength: the mean activation per token, "brightness" in one number.
                    values[when] = (
                        {"frequency": freq, "strength": strength, "mass": freq * strength}[name].mean().item()
                    )
                b, a = values["before"], values["after"]
                entry[f"{name}_before"], entry[f"{name}_after"] = b, a
                entry[f"{name}_log2_ratio"] = math.log2(a / b) if a > 0 and b > 0 else None
            out[lang][str(layer)] = {**entry, "features": indices}
    return out


# ---------------------------------------------------------------------------------------------
# Attribution graphs
# ---------------------------------------------------------------------------------------------


def edge_strength_by_layer(g, n_layers: int) -> Float[Tensor, "source target"]:
    """Σ |weight| of the graph's edges by (source layer, target layer); tokens are source row 0,
    layers 0…L−1 rows 1…L, targets the last column (index L)."""
    strength = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    for source, target, data in g.edges(data=True):
        s, t = g.nodes[source], g.nodes[target]
        row = 0 if s["kind"] == "token" else s["layer"] + 1
        column = n_layers if t["kind"] == "target" else t["layer"]
        strength[row, column] += abs(data["weight"])
    return strength


def edge_change(before_graph, after_graph) -> dict:
    """How much the edges between the same node ids changed (graphs of the same prompt; ids name the
    layer, feature and position, so an edge is "the same" when both its ends are)."""
    # Edges into targets are left out: each model's salient targets are its own top logits, so `T0`
    # need not be the same token in both graphs.
    b = {
        (u, v): d["weight"]
        for u, v, d in before_graph.edges(data=True)
        if before_graph.nodes[v]["kind"] != "target"
    }
    a = {
        (u, v): d["weight"]
        for u, v, d in after_graph.edges(data=True)
        if after_graph.nodes[v]["kind"] != "target"
    }
    union, shared = set(a) | set(b), set(a) & set(b)
    change = sum(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in union)
    base = sum(abs(w) for w in b.values())
    return {
        "edges_before": len(b),
        "edges_after": len(a),
        "edge_jaccard": len(shared) / max(1, len(union)),
        "relative_change": change / base if base else None,
        "shared_edge_strength_before": sum(abs(b[key]) for key in shared),
        "shared_edge_strength_after": sum(abs(a[key]) for key in shared),
    }


def feature_keys(g, layers: set[int]) -> set[tuple[int, int]]:
    return {
        (d["layer"], d["feature"])
        for _, d in g.nodes(data=True)
        if d["kind"] == "feature" and d["layer"] in layers
    }


def cluster_strength(g, shared: set[tuple[int, int]]) -> float:
    """Share of the graph's |edge weight| that leaves features in `shared` (a cross-lingual cluster)."""
    total = sum(abs(d["weight"]) for _, _, d in g.edges(data=True))
    out = sum(
        abs(d["weight"])
        for u, _, d in g.edges(data=True)
        if g.nodes[u]["kind"] == "feature" and (g.nodes[u]["layer"], g.nodes[u]["feature"]) in shared
    )
    return out / total if total else 0.0


def error_share(g) -> float:
    """Share of the graph's |edge weight| that leaves error nodes: how much the CLT fails to explain
    (it grows when the CLT drifts off a fine-tuned model, and feature-based shares shrink with it)."""
    total = sum(abs(d["weight"]) for _, _, d in g.edges(data=True))
    errors = sum(abs(d["weight"]) for u, _, d in g.edges(data=True) if g.nodes[u]["kind"] == "error")
    return errors / total if total else 0.0


def middle_layers(n_layers: int) -> set[int]:
    """Layers strictly between the first and the last (all layers for models with < 3)."""
    return set(range(1, n_layers - 1)) or set(range(n_layers))


def graph_differences(graphs: dict[str, dict[str, list]], n_layers: int) -> dict:
    """`graphs[model][lang]` = networkx graphs of parallel prompts (index i = the same paragraph).

    Returns per language: mean edge change before → after, edge strength by layer pair, and the
    middle-layer cross-lingual cluster strength of each model."""
    middle = middle_layers(n_layers)
    langs = list(graphs["before"])
    n_prompts = min(len(graphs[m][lang]) for m in graphs for lang in langs)
    out: dict = {"middle_layers": sorted(middle), "per_lang": {}}
    cluster: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in graphs}
    for i in range(n_prompts):
        for model_name in graphs:
            keys = {lang: feature_keys(graphs[model_name][lang][i], middle) for lang in langs}
            for lang in langs:
                others = set().union(*(keys[o] for o in langs if o != lang)) if len(langs) > 1 else set()
                cluster[model_name][lang].append(
                    cluster_strength(graphs[model_name][lang][i], keys[lang] & others)
                )
    for lang in langs:
        changes = [edge_change(graphs["before"][lang][i], graphs["after"][lang][i]) for i in range(n_prompts)]
        by_layer = {
            m: sum(edge_strength_by_layer(graphs[m][lang][i], n_layers) for i in range(n_prompts)) / n_prompts
            for m in graphs
        }
        relative = [c["relative_change"] for c in changes if c["relative_change"] is not None]
        out["per_lang"][lang] = {
            "edge_relative_change": sum(relative) / len(relative) if relative else None,
            "edge_jaccard": sum(c["edge_jaccard"] for c in changes) / len(changes),
            "edges_before": sum(c["edges_before"] for c in changes) / len(changes),
            "edges_after": sum(c["edges_after"] for c in changes) / len(changes),
            "strength_by_layer_before": by_layer["before"].tolist(),
            "strength_by_layer_after": by_layer["after"].tolist(),
            "middle_cluster_strength_before": sum(cluster["before"][lang]) / n_prompts,
            "middle_cluster_strength_after": sum(cluster["after"][lang]) / n_prompts,
            **{
                f"error_share_{m}": sum(error_share(g) for g in graphs[m][lang][:n_prompts]) / n_prompts
                for m in graphs
            },
        }
    out["n_prompts"] = n_prompts
    return out


# ---------------------------------------------------------------------------------------------
# Tokenisation and early layers; logit lens
# ---------------------------------------------------------------------------------------------


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else None


def fertility_and_early_features(fertility: dict[str, dict], stats: dict[str, dict]) -> dict:
    """Tokens per word per language next to layer-0 L0 and mean layer-0 strength on each model, with
    the across-language correlation (Harrasse et al. 2025: English-biased tokenisation makes early layers work
    harder to reassemble words)."""
    langs = [lang for lang in stats["before"]["langs"] if lang in fertility]
    rows, out = {}, {}
    for lang in langs:
        k = stats["before"]["langs"].index(lang)
        row = {"tokens_per_word": fertility[lang]["tokens_per_word"]}
        for name, s in stats.items():
            row[f"layer0_l0_{name}"] = s["l0"][lang][0]
            freq, strength = s["frequency"][0, :, k], s["strength"][0, :, k]
            row[f"layer0_strength_{name}"] = ((freq * strength).sum() / freq.sum().clamp_min(1e-12)).item()
        rows[lang] = row
    for name in stats:
        xs = [rows[lang]["tokens_per_word"] for lang in langs]
        out[f"corr_fertility_layer0_l0_{name}"] = pearson(
            xs, [rows[lang][f"layer0_l0_{name}"] for lang in langs]
        )
    return {"per_lang": rows, **out}


@torch.no_grad()
def lens_kl(
    before, after, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
) -> dict[str, list[float]]:
    """Mean KL(before ‖ after) of the logit-lens next-token distributions after each block (BOS excluded)."""
    device = next(before.parameters()).device
    out = {}
    for lang, blocks in blocks_by_lang.items():
        total, count = None, 0
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size].to(device)
            kl = next_token_kl(  # [layer, batch, pos]
                lens_logits(before, residual_stream(before, batch))[:, :, 1:],
                lens_logits(after, residual_stream(after, batch))[:, :, 1:],
            )
            total = kl.sum((1, 2)) if total is None else total + kl.sum((1, 2))
            count += kl.shape[1] * kl.shape[2]
        out[lang] = (total / count).tolist()
    return out


@torch.no_grad()
def feature_drift(base: CrossLayerTranscoder, warm: CrossLayerTranscoder, identity: dict) -> dict:
    """Feature by feature, base CLT vs its continuation on the other model (same feature indices): per
    layer, the mean cosine of each feature's decoder (all its target layers) and encoder, the share of
    features whose decoder turned by more than cos 0.9; and the decoder cosine of each language's
    identity features."""

    def flat_decoders(clt):
        return [rearrange(w.detach().cpu(), "f t d -> f (t d)") for w in clt.W_dec]

    dec_a, dec_b = flat_decoders(base), flat_decoders(warm)
    per_layer = []
    for layer in range(base.config.n_layers):
        dec = F.cosine_similarity(dec_a[layer], dec_b[layer], dim=1)
        enc = F.cosine_similarity(
            base.W_enc[layer].detach().cpu().T, warm.W_enc[layer].detach().cpu().T, dim=1
        )
        per_layer.append(
            {
                "decoder_cosine": float(dec.mean()),
                "encoder_cosine": float(enc.mean()),
                "turned_share": float((dec < 0.9).float().mean()),
            }
        )
    by_lang = {}
    for lang, layers in identity.items():
        cosines = [
            float(F.cosine_similarity(dec_a[int(layer)][f], dec_b[int(layer)][f], dim=0))
            for layer, features in layers.items()
            for f in features
        ]
        by_lang[lang] = sum(cosines) / len(cosines) if cosines else None
    return {"per_layer": per_layer, "identity_decoder_cosine": by_lang}
