"""Model diffing with a crosscoder trained on both models (clt/crosscoder.py; issue #15).

On the same held-out token blocks of every language, both models' activations at the crosscoder's sites
are encoded together; per latent: its relative decoder norm (≈ 0 before-only, ≈ 0.5 shared, ≈ 1
after-only), its firing frequency per language, and for the after-only latents that fire most on the
focus language: top contexts, the tokens its after-model decoder promotes directly (through ln_f and
W_U), latent scaling (is it really absent from the before model?), and one causal check — add the
change of the latent's decoder (after − before, × its mean activation) to the *before* model's residual
at its site and measure the change in loss per language against a shared latent's decoder change scaled
to the same norm; where no latent is after-only, on the most after-leaning latents.

Per layer (`layer_brightening`), seed 003's "fine-tuning brightens the weak language's late features and
strengthens middle-layer clusters" in crosscoder terms: a latent's activation is shared by both models,
so what differs is its decoder — log2(‖W_dec^after‖ / ‖W_dec^before‖) in each model's own units at each
layer, for the latents most specific to the focus language and for the cross-lingual latents (firing
in every language), each against random sets of live latents of the same size (which also absorbs any
global change of a layer's activation scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clt.crosscoder import Crosscoder, classify_latents, latent_scaling
from clt.recorder import MLPActivationRecorder


@torch.no_grad()
def site_activations(model, blocks: Int[Tensor, "n pos"], site: str, layers: list[int], batch_size: int = 16):
    """[tokens, sites, d] at `site` (mlp_out / mlp_in) of `layers`, BOS positions dropped."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(blocks), batch_size):
        with MLPActivationRecorder(model) as recorder:
            model.transformer(input_ids=blocks[start : start + batch_size].to(device))
        source = recorder.outputs if site == "mlp_out" else recorder.inputs
        out.append(torch.stack([source[l][:, 1:] for l in layers], dim=2).flatten(0, 1))
    return torch.cat(out)


@torch.no_grad()
def crosscoder_diff(
    before,
    after,
    tokenizer,
    crosscoder: Crosscoder,
    site: str,
    layers: list[int],
    blocks_by_lang: dict[str, Int[Tensor, "n pos"]],
    focus_lang: str,
    top: int = 8,
) -> dict:
    langs = list(blocks_by_lang)
    scale = crosscoder.input_scale[None, :, None]
    paired, token_langs, token_ids = [], [], []
    for k, lang in enumerate(langs):
        blocks = blocks_by_lang[lang]
        x = torch.cat([site_activations(m, blocks, site, layers) for m in (before, after)], dim=1)
        paired.append(x.cpu().float())
        token_langs += [k] * len(x)
        token_ids.append(blocks[:, 1:].flatten())
    x = torch.cat(paired).to(crosscoder.b_dec.device) * scale
    ids = torch.cat(token_ids)
    lang_index = torch.tensor(token_langs)
    _, acts, _ = crosscoder(x)
    on = (acts[:, 0] > 0).float().cpu()
    frequency = torch.stack([on[lang_index == k].mean(0) for k in range(len(langs))])  # [lang, F]
    relative = crosscoder.relative_norms().cpu()
    ever = on.sum(0) > 0
    k_focus = langs.index(focus_lang)
    others = torch.cat([frequency[:k_focus], frequency[k_focus + 1 :]]).mean(0)
    specificity = frequency[k_focus] - others
    after_only = [
        int(j) for j in torch.argsort(specificity, descending=True) if relative[j] > 0.9 and ever[j]
    ][:top]
    before_only = [
        int(j) for j in torch.argsort(specificity, descending=True) if relative[j] < 0.1 and ever[j]
    ][:top]
    shared = [
        int(j) for j in torch.argsort(frequency[k_focus], descending=True) if 0.4 <= relative[j] <= 0.6
    ][:1]
    scaling = latent_scaling(crosscoder, x, after_only)
    blocks_focus = blocks_by_lang[focus_lang]
    focus_acts = acts[lang_index == k_focus, 0].cpu()

    def describe(j: int) -> dict:
        values = acts[:, 0, j].cpu()
        best = torch.argsort(values, descending=True)[:3]
        return {
            "latent": j,
            "relative_norm": float(relative[j]),
            "frequency_by_lang": dict(zip(langs, frequency[:, j].tolist())),
            "top_tokens": [tokenizer.decode([int(ids[i])]) for i in best if values[i] > 0],
            "promotes": promoted_tokens(after, tokenizer, crosscoder, j, model_index=1),
            "latent_scaling": scaling.get(j),
        }

    alive = ever.nonzero()[:, 0]
    by_lean = alive[torch.argsort(relative[alive], descending=True)]  # live latents, most after-leaning first
    # Without after-only latents, the check runs on the most after-leaning latents that fire on the focus
    # language (what fine-tuning moved most), and the report says which it used.
    leaning_focus = [int(j) for j in by_lean if frequency[k_focus, j] > 0][:3]
    causal_latents, causal_basis = (
        (after_only[:3], "after-only") if after_only else (leaning_focus, "most after-leaning")
    )
    causal = []
    for j in causal_latents:
        mean_activation = (
            float(focus_acts[:, j][focus_acts[:, j] > 0].mean()) if (focus_acts[:, j] > 0).any() else 0.0
        )
        causal.append(
            causal_check(
                before, crosscoder, j, shared[0] if shared else None, mean_activation, layers, blocks_by_lang
            )
        )
    most_specific = alive[torch.argsort(specificity[alive], descending=True)[:20]]
    # Cross-lingual: fires on at least 1% of every language's tokens (the "clusters" shared across them).
    cross_lingual = alive[(frequency[:, alive] >= 0.01).all(0)]
    leaning = by_lean[:top]
    return {
        "langs": langs,
        "focus_lang": focus_lang,
        "latent_counts": classify_latents(relative, ever),
        # Whether fine-tuning tilted the focus language's latents towards the after model even when none
        # passes the after-only threshold: their mean relative norm against random sets of live latents.
        "focus_specific_lean": leaning_test(relative[alive], relative[most_specific]),
        "most_after_leaning": [describe(int(j)) for j in leaning],
        "relative_norm_histogram": torch.histc(relative[ever], bins=20, min=0, max=1).tolist(),
        "after_only": [describe(j) for j in after_only],
        "before_only": [describe(j) for j in before_only],
        "after_only_frequency_by_lang": {
            lang: float(frequency[k][relative > 0.9].sum()) for k, lang in enumerate(langs)
        },
        "causal": causal,
        "causal_basis": causal_basis,
        "layer_brightening": layer_brightening(crosscoder, layers, ever, most_specific, cross_lingual),
        "tokens": len(x),
        "focus_blocks": len(blocks_focus),
    }


def decoder_log_ratios(crosscoder: Crosscoder) -> Float[Tensor, "site feature"]:
    """log2(‖W_dec^after[f, site]‖ / ‖W_dec^before[f, site]‖) in each model's own units (the decoders
    reconstruct activations multiplied by the site's scale, so a norm is divided by it)."""
    n_models = crosscoder.config.n_models
    norms = crosscoder.W_dec.detach().norm(dim=-1).T  # [input, feature], inputs model-major
    norms = norms / crosscoder.output_scale[:, None]
    per_model = rearrange(norms, "(m s) f -> m s f", m=n_models)
    return torch.log2(per_model[1].clamp(min=1e-12) / per_model[0].clamp(min=1e-12))


def layer_brightening(
    crosscoder: Crosscoder,
    layers: list[int],
    ever: Bool[Tensor, " feature"],
    focus_specific: Int[Tensor, " chosen"],
    cross_lingual: Int[Tensor, " chosen"],
) -> list[dict]:
    """Per layer: the mean decoder log-ratio of all live latents, and of the focus language's most
    specific and the cross-lingual latents against random live sets of their size (`leaning_test`)."""
    ratios = decoder_log_ratios(crosscoder).cpu()
    alive = ever.nonzero()[:, 0]
    out = []
    for site, layer in enumerate(layers):
        row = ratios[site]
        out.append(
            {
                "layer": layer,
                "all_live_mean_log2": float(row[alive].mean()) if len(alive) else float("nan"),
                "focus_specific": leaning_test(row[alive], row[focus_specific]),
                "cross_lingual": leaning_test(row[alive], row[cross_lingual]),
            }
        )
    return out


def leaning_test(
    relative_alive: Float[Tensor, " alive"], relative_chosen: Float[Tensor, " chosen"], draws: int = 2000
) -> dict:
    """Mean of a per-latent value (relative decoder norm, decoder log-ratio) over the chosen latents vs
    same-size random sets of live latents (a permutation null, seeded): the observed mean, the null's
    mean and 95% interval, and the share of random sets with a mean at least as high (one-sided p)."""
    generator = torch.Generator().manual_seed(0)
    n = len(relative_chosen)
    if n == 0 or len(relative_alive) < n:
        return {"n": n, "observed": float("nan"), "null_mean": float("nan"), "null_low": float("nan"),
                "null_high": float("nan"), "p_at_least": float("nan")}  # fmt: skip
    picks = torch.stack([torch.randperm(len(relative_alive), generator=generator)[:n] for _ in range(draws)])
    null = relative_alive[picks].mean(1)
    observed = float(relative_chosen.mean())
    return {
        "n": n,
        "observed": observed,
        "null_mean": float(null.mean()),
        "null_low": float(null.quantile(0.025)),
        "null_high": float(null.quantile(0.975)),
        "p_at_least": float((null >= observed).float().mean()),
    }


def promoted_tokens(
    model, tokenizer, crosscoder: Crosscoder, j: int, model_index: int, k: int = 8
) -> list[str]:
    """Tokens the latent's decoder (at its last site, in the model's units) raises most directly."""
    from analysis.output_features import logit_directions

    S = crosscoder.config.n_sites
    site = model_index * S + S - 1
    direction = crosscoder.W_dec[j, site].detach().cpu() / crosscoder.output_scale[site].cpu()
    W_U = model.lm_head.weight.detach().cpu().float()
    top = (W_U @ logit_directions(model, direction)).topk(k).indices.tolist()
    return [tokenizer.decode([t]) for t in top]


@torch.no_grad()
def causal_check(
    before,
    crosscoder: Crosscoder,
    latent: int,
    control: int | None,
    mean_activation: float,
    layers: list[int],
    blocks_by_lang: dict[str, Int[Tensor, "n pos"]],
) -> dict:
    """Δ loss per language (nats/token) of the before model when the change of the latent's decoder rows
    (after − before), × its mean activation on the focus language, is added to its residual after each
    site's layer at every position; and the same for a shared latent's rows scaled to the same norms."""
    from interventions.hooks import ResidualAdd, Where

    S = crosscoder.config.n_sites

    def vectors(j: int) -> list[Float[Tensor, " d"]]:
        # What fine-tuning changed in the latent's write, in model units: after − before decoder (for an
        # after-only latent the before decoder is ≈ 0, so this is its after decoder).
        dec, scale = crosscoder.W_dec[j].detach().cpu(), crosscoder.output_scale.cpu()
        return [dec[S + s] / scale[S + s] - dec[s] / scale[s] for s in range(S)]

    added = [mean_activation * v for v in vectors(latent)]
    result = {"latent": latent, "mean_activation": mean_activation, "norms": [float(v.norm()) for v in added]}
    for name, vecs in (("latent", added), ("control", None)):
        if name == "control":
            if control is None:
                continue
            vecs = [v / v.norm().clamp(min=1e-12) * a.norm() for v, a in zip(vectors(control), added)]
            result["control_latent"] = control
        edits = [ResidualAdd(layer, v, 1.0, Where(start=1)) for layer, v in zip(layers, vecs)]
        result[f"delta_loss_{name}"] = {
            lang: _loss(before, blocks, edits) - _loss(before, blocks, [])
            for lang, blocks in blocks_by_lang.items()
        }
    return result


def _loss(model, blocks: Tensor, edits: list, batch_size: int = 16) -> float:
    from interventions.hooks import Intervener

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with Intervener(model, None, edits):
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start : start + batch_size].to(device).long()
            logits = model(input_ids=ids).logits[:, :-1]
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    return total / count
