"""Language-identity CLT features (Harrasse et al. 2025; docs/methods.md §4).

For every feature of every layer: activation frequency per language (share of non-BOS tokens of text in
that language where it fires), the LAPE-style entropy of its language mix (in bits, as the seed repo
reports it: a feature firing only on one language has 0 bits; uniformly over 6 languages, log2 6 ≈ 2.58),
and from these a catalogue of the features that best identify each language — low entropy
(≤ `max_entropy_bits`, the seed repo's 0.8) and frequent in that language — with their layer,
frequencies, top-activating contexts and the tokens their decoders promote most.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analysis.firing import firing_share
from analysis.lape import entropy
from analysis.output_features import logit_directions, written_directions
from clt.model import CrossLayerTranscoder
from clt.recorder import MLPActivationRecorder


@torch.no_grad()
def clt_features(
    model, clt: CrossLayerTranscoder, input_ids: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer batch pos feature"]:
    """CLT feature activations of every layer on the model's own MLP inputs."""
    with MLPActivationRecorder(model) as recorder:
        model.transformer(input_ids=input_ids)
    return torch.stack(
        [
            clt.encode_layer(recorder.inputs[layer] * clt.input_scale[layer], layer)
            for layer in range(clt.config.n_layers)
        ]
    )


def feature_activation_probability(
    model, clt: CrossLayerTranscoder, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
) -> Float[Tensor, "layer feature lang"]:
    """Share of (non-BOS) tokens of each language on which each CLT feature fires."""
    device = next(model.parameters()).device
    return firing_share(lambda ids: clt_features(model, clt, ids), blocks_by_lang, batch_size, device)


def entropy_bits(probabilities: Float[Tensor, "... lang"]) -> Float[Tensor, "..."]:
    return entropy(probabilities) / math.log(2)


def language_features(
    probabilities: Float[Tensor, "layer feature lang"],
    langs: list[str],
    max_entropy_bits: float = 0.8,
    min_frequency: float = 0.01,
    per_lang: int = 10,
) -> dict[str, list[dict]]:
    """Per language: features whose language mix has at most `max_entropy_bits` and that fire on at
    least `min_frequency` of that language's tokens, most frequent first (the seed's high-frequency
    language features), at most `per_lang`."""
    h = entropy_bits(probabilities)
    share = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
    dominant = share.argmax(-1)
    catalogue: dict[str, list[dict]] = {}
    for k, lang in enumerate(langs):
        mask = (dominant == k) & (h <= max_entropy_bits) & (probabilities[..., k] >= min_frequency)
        layers, feats = mask.nonzero(as_tuple=True)
        order = torch.argsort(probabilities[layers, feats, k], descending=True)[:per_lang]
        catalogue[lang] = [
            {
                "layer": int(layers[i]),
                "feature": int(feats[i]),
                "frequency": float(probabilities[layers[i], feats[i], k]),
                "max_other_frequency": float(
                    torch.cat(
                        [probabilities[layers[i], feats[i], :k], probabilities[layers[i], feats[i], k + 1 :]]
                    ).max()
                )
                if len(langs) > 1
                else 0.0,
                "entropy_bits": float(h[layers[i], feats[i]]),
                "share": float(share[layers[i], feats[i], k]),
            }
            for i in order
        ]
    return catalogue


@torch.no_grad()
def top_contexts(
    model,
    clt: CrossLayerTranscoder,
    tokenizer,
    blocks: Int[Tensor, "n pos"],
    features: list[tuple[int, int]],
    k: int = 3,
    window: int = 8,
    batch_size: int = 16,
) -> dict[tuple[int, int], list[dict]]:
    """The k highest activations of each (layer, feature) over `blocks`, with the preceding `window`
    tokens and the token itself marked [[like this]]."""
    device = next(model.parameters()).device
    best: dict[tuple[int, int], list[tuple[float, int, int]]] = {f: [] for f in features}
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        acts = clt_features(model, clt, batch)
        for layer, feature in features:
            values = acts[layer, :, 1:, feature].flatten()
            top = values.topk(min(k, values.numel()))
            for value, index in zip(top.values.tolist(), top.indices.tolist()):
                if value > 0:
                    b, p = divmod(index, acts.shape[2] - 1)
                    best[(layer, feature)].append((value, start + b, p + 1))
    out = {}
    for key, items in best.items():
        items = sorted(items, reverse=True)[:k]
        out[key] = [
            {
                "activation": value,
                "context": tokenizer.decode(blocks[b, max(1, p - window) : p].tolist())
                + "[["
                + tokenizer.decode([int(blocks[b, p])])
                + "]]",
            }
            for value, b, p in items
        ]
    return out


@torch.no_grad()
def promoted_tokens(
    model, clt: CrossLayerTranscoder, tokenizer, features: list[tuple[int, int]], k: int = 8
) -> dict[tuple[int, int], list[str]]:
    """Tokens whose logits a feature's decoders raise most directly:
    centre(Σ_targets W_dec) ⊙ ln_f.weight · W_U
    (ln_f's centring and weight are linear and kept; its scale is a positive per-position factor that
    does not change the ranking)."""
    W_U = model.lm_head.weight.detach().cpu().float()  # [vocab, d]
    directions = logit_directions(model, written_directions(clt))  # ln_f centres, then scales by its weight
    out = {}
    for layer, feature in features:
        top = (W_U @ directions[layer, feature]).topk(k).indices.tolist()
        out[(layer, feature)] = [tokenizer.decode([t]) for t in top]
    return out
