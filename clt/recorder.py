"""Where CLT activations are read: every layer's MLP input and output, through the hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from training import hook_points

INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"  # MLP input
OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"  # MLP output


class MLPActivationRecorder:
    """Every layer's MLP input (`blocks.l.ln2.hook_normalized`) and MLP output (`blocks.l.hook_mlp_out`) —
    the project's one definition of where CLT activations are read (training/hook_points.py).

    By default the tensors are kept in `inputs` / `outputs`; `sink(kind, layer, tensor)` (kind is
    "mlp_in" or "mlp_out") receives them instead, e.g. to copy them straight into a shard buffer."""

    def __init__(self, model, sink=None):
        self.model = model
        self.n_layers = hook_points.adapter(model).n_layers
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.sink = sink or self._keep

    def __enter__(self):
        named = []
        for layer in range(self.n_layers):
            named.append((INPUT_HOOK.format(layer=layer), self._hook("mlp_in", layer)))
            named.append((OUTPUT_HOOK.format(layer=layer), self._hook("mlp_out", layer)))
        self._context = hook_points.hooks(self.model, named)
        self._context.__enter__()
        return self

    def _hook(self, kind: str, layer: int):
        def hook(tensor):
            self.sink(kind, layer, tensor.detach())

        return hook

    def _keep(self, kind: str, layer: int, tensor: Tensor) -> None:
        (self.inputs if kind == "mlp_in" else self.outputs)[layer] = tensor

    def __exit__(self, *exc):
        self._context.__exit__(*exc)

    def stacked(self) -> tuple[Float[Tensor, "batch pos layer d"], Float[Tensor, "batch pos layer d"]]:
        layers = range(self.n_layers)
        return (
            torch.stack([self.inputs[l] for l in layers], dim=2),
            torch.stack([self.outputs[l] for l in layers], dim=2),
        )


@torch.no_grad()
def mlp_activations(
    model, input_ids: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos layer d"], Float[Tensor, "batch pos layer d"]]:
    """Every layer's MLP input and output. Runs the transformer body only: the unembedding (which on a
    small model with an 8k vocabulary costs more than all the layers together) is not needed."""
    with MLPActivationRecorder(model) as recorder:
        model.transformer(input_ids=input_ids)
        return recorder.stacked()
