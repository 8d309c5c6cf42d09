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


@torch.no_grad()
def residual_stream(model, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None
                    ) -> Float[Tensor, "layer batch pos d"]:
    """Residual after each of the L blocks (layer l = output of block l)."""
    outputs: dict[int, Tensor] = {}
    handles = [block.register_forward_hook(lambda module, args, output, layer=layer: outputs.__setitem__(layer, output[0]))
               for layer, block in enumerate(model.transformer.h)]
    try:
        model.transformer(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([outputs[layer] for layer in range(len(model.transformer.h))])


def lens_logits(model, residual: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
    """The logit lens: the model's own final LayerNorm and unembedding applied to any residual."""
    return model.lm_head(model.transformer.ln_f(residual))


class SkipLayers:
    """Context manager: the given blocks return their input residual unchanged."""

    def __init__(self, model, layers: Iterable[int]):
        self.blocks = model.transformer.h
        self.layers = sorted(set(layers))
        if any(not 0 <= layer < len(self.blocks) for layer in self.layers):
            raise ValueError(f"layers {self.layers} out of range for a {len(self.blocks)}-layer model")
        self._handles = []

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(self.blocks[layer].register_forward_hook(_pass_through, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _pass_through(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) + tuple(output[1:])


def mean_pool(hidden: Float[Tensor, "layer batch pos d"], mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "layer batch d"]:
    """Mean over the positions where mask is 1 (padding and BOS excluded by the caller's mask)."""
    weights = rearrange(mask.to(hidden.dtype), "b p -> 1 b p 1")
    return (hidden * weights).sum(2) / weights.sum(2).clamp(min=1)
