"""Residual-stream access and layer skipping for HF GPT-2 models (forward hooks, removed on exit).

`residual_stream` returns the residual after every block — the stream before ln_f, unlike HF's
`output_hidden_states`, whose last entry already has ln_f applied. `SkipLayers` makes chosen blocks
pass their input through unchanged (their attention and MLP updates are zeroed), CogSym's ablation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from training import hook_points
from training.errors import UserError


@torch.no_grad()
def residual_stream(
    model, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None
) -> Float[Tensor, "layer batch pos d"]:
    """Residual after each of the L blocks (layer l = `blocks.l.hook_resid_post`)."""
    return hook_points.record_layers(
        model, "blocks.{l}.hook_resid_post", input_ids=input_ids, attention_mask=attention_mask
    )


@torch.no_grad()
def residual_means(
    model, blocks_by_lang: dict[str, Int[Tensor, "n pos"]], batch_size: int = 16
) -> dict[str, Float[Tensor, "layer d"]]:
    """Per language, the mean residual after each block over its tokens (BOS excluded)."""
    from analysis.firing import firing_counts

    device = next(model.parameters()).device
    out = {}
    for lang, blocks in blocks_by_lang.items():
        # The residual as [layer, batch, pos, d] "units": their mean activation is the mean residual.
        counter = firing_counts(lambda ids: residual_stream(model, ids), {lang: blocks}, batch_size, device)
        out[lang] = counter.mean_activation()[..., 0].cpu()
    return out


def lens_logits(model, residual: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
    """The logit lens: the model's own final LayerNorm and unembedding applied to any residual."""
    return model.lm_head(model.transformer.ln_f(residual))


class SkipLayers:
    """Context manager: the given blocks return their input residual unchanged."""

    def __init__(self, model, layers: Iterable[int]):
        self.model = model
        n_layers = hook_points.adapter(model).n_layers
        self.layers = sorted(set(layers))
        if any(not 0 <= layer < n_layers for layer in self.layers):
            raise UserError(f"layers {self.layers} out of range for a {n_layers}-layer model")
        self._inputs: dict[int, Tensor] = {}

    def __enter__(self):
        named = []
        for layer in self.layers:
            named.append(
                (
                    f"blocks.{layer}.hook_resid_pre",
                    lambda resid, layer=layer: self._inputs.__setitem__(layer, resid),
                )
            )
            named.append(
                (f"blocks.{layer}.hook_resid_post", lambda resid, layer=layer: self._inputs.pop(layer))
            )
        self._context = hook_points.hooks(self.model, named)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._inputs.clear()
        return self._context.__exit__(*exc)


def mean_pool(
    hidden: Float[Tensor, "layer batch pos d"], mask: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer batch d"]:
    """Mean over the positions where mask is 1 (padding and BOS excluded by the caller's mask)."""
    weights = rearrange(mask.to(hidden.dtype), "b p -> 1 b p 1")
    return (hidden * weights).sum(2) / weights.sum(2).clamp(min=1)
