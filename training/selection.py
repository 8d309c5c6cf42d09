"""Which parameters a fine-tuning run may change, and exact masking of everything else.

A `Selection` maps parameter names (as `model.named_parameters()` lists them, so the tied GPT-2 LM
head appears once, as `transformer.wte.weight`) to `None` (the whole tensor trains) or a boolean mask of
the tensor's shape (only True entries train). Strategies (docs/methods.md §6):

- `full`: every parameter;
- `last-k`: the last k transformer blocks (LinguaMap);
- `outermost`: a share of the blocks (25%) split between the first and the last ones (CogSym), with at
  least one block on each side — on a 4-layer model that is blocks 0 and 3;
- `neurons`: MLP neurons — for neuron j of layer l the `c_fc` column j, `c_fc` bias j and `c_proj`
  row j (LAPE fine-tuning's LAPE fine-tuning; GPT-2's Conv1D stores weights as [in, out]);
- `random`: a random subset of the same kind and size as another selection — neurons with the same count
  per layer outside the reference neurons, or the same number of blocks outside the reference blocks;
- `embeddings`: only the tied token embedding / LM head and the position embeddings (a control).

Tied embeddings. GPT-2 shares one matrix between the token embedding and the LM head, so "train the
head" and "train the input embeddings" cannot be separated without untying (which changes the model's
architecture and every exported format). We keep the tie: only `full` trains the embeddings (input and
output together); every selective strategy leaves `wte` (= LM head), `wpe` and the final LayerNorm
untouched unless `train_embeddings=True` adds `wte` and `wpe` explicitly.

`MaskedTraining` makes masked training exact: parameters with nothing selected get
`requires_grad=False` and stay out of the optimizer; partially selected ones get a gradient hook that
zeroes the unselected entries (so AdamW's moments stay exactly 0 there and its update is exactly 0), and
after every optimizer step the unselected entries are copied back from a snapshot, which undoes AdamW's
decoupled weight decay (the one thing that moves a parameter without a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from training import hook_points

STRATEGIES = ("full", "last-k", "outermost", "lape", "located", "lora", "random", "embeddings")
EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")


@dataclass
class Selection:
    """Trainable entries: name → None (whole tensor) or a bool mask; `layers`/`neurons` say what was
    chosen."""

    strategy: str
    masks: dict[str, Tensor | None]
    layers: list[int] = field(default_factory=list)
    neurons: list[tuple[int, int]] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "strategy": self.strategy,
            "layers": self.layers,
            "neurons": [list(u) for u in self.neurons],
            "tensors": sorted(self.masks),
        }


def n_layers(model) -> int:
    return model.config.n_layer


def n_neurons(model) -> int:
    return hook_points.adapter(model).d_mlp


def random_matched(
    neurons: list[tuple[int, int]], n_units: int, seed: int, exclude: set | None = None
) -> list[tuple[int, int]]:
    """Random neurons with the same count per layer (excluding `exclude`): the control for any neuron set."""
    generator = np.random.default_rng(seed)
    exclude = exclude or set()
    counts: dict[int, int] = {}
    for layer, _ in neurons:
        counts[layer] = counts.get(layer, 0) + 1
    out = []
    for layer, count in sorted(counts.items()):
        pool = [u for u in range(n_units) if (layer, u) not in exclude]
        out += [(layer, int(u)) for u in generator.choice(pool, size=count, replace=False)]
    return out


def full(model) -> Selection:
    return Selection(
        "full", {name: None for name, _ in model.named_parameters()}, layers=list(range(n_layers(model)))
    )


def blocks(model, layers: list[int], strategy: str = "layers") -> Selection:
    """Every parameter of the given transformer blocks (attention, MLP, both LayerNorms)."""
    layers = sorted(set(layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers(model)]
    if bad or not layers:
        raise ValueError(f"layers {layers} must be a non-empty subset of 0…{n_layers(model) - 1}")
    prefixes = tuple(f"transformer.h.{layer}." for layer in layers)
    return Selection(
        strategy,
        {name: None for name, _ in model.named_parameters() if name.startswith(prefixes)},
        layers=layers,
    )


def last_k(model, k: int) -> Selection:
    if not 1 <= k <= n_layers(model):
        raise ValueError(f"last-k needs 1 ≤ k ≤ {n_layers(model)}, got {k}")
    return blocks(model, list(range(n_layers(model) - k, n_layers(model))), "last-k")


def outermost(model, share: float = 0.25) -> Selection:
    """`share` of the blocks split between the first and the last ones (the first side gets the smaller
    half)."""
    total = max(2, round(share * n_layers(model)))
    first = total // 2
    return blocks(
        model,
        list(range(first)) + list(range(n_layers(model) - (total - first), n_layers(model))),
        "outermost",
    )


def neurons(model, units: list[tuple[int, int]], strategy: str = "neurons") -> Selection:
    """MLP neurons: `c_fc` column j and bias j, `c_proj` row j of each (layer, j)."""
    units = sorted({(int(layer), int(j)) for layer, j in units})
    if not units:
        raise ValueError(f"{strategy}: no neurons to train (the located file lists none for these languages)")
    width = n_neurons(model)
    bad = [u for u in units if not (0 <= u[0] < n_layers(model) and 0 <= u[1] < width)]
    if bad:
        raise ValueError(
            f"{strategy}: neurons {bad[:3]} do not exist in a {n_layers(model)}-layer model with {width} "
            "neurons"
        )
    params = dict(model.named_parameters())
    masks: dict[str, Tensor] = {}
    for layer, j in units:
        mlp = f"transformer.h.{layer}.mlp"
        for name in (f"{mlp}.c_fc.weight", f"{mlp}.c_fc.bias", f"{mlp}.c_proj.weight"):
            masks.setdefault(name, torch.zeros_like(params[name], dtype=torch.bool))
        masks[f"{mlp}.c_fc.weight"][:, j] = True
        masks[f"{mlp}.c_fc.bias"][j] = True
        masks[f"{mlp}.c_proj.weight"][j, :] = True
    return Selection(strategy, masks, layers=sorted({u[0] for u in units}), neurons=units)


def random_like(model, reference: Selection, seed: int) -> Selection:
    """A random selection of the same kind and parameter count as `reference`, disjoint from it."""
    if reference.neurons:
        units = random_matched(reference.neurons, n_neurons(model), seed, exclude=set(reference.neurons))
        return neurons(model, units, "random")
    if reference.strategy in ("full", "lora") or not reference.layers:
        raise ValueError(
            f"random: cannot match a {reference.strategy!r} selection (use a layer or neuron strategy)"
        )
    pool = [layer for layer in range(n_layers(model)) if layer not in reference.layers]
    if len(pool) < len(reference.layers):
        raise ValueError(f"random: {len(reference.layers)} blocks outside {reference.layers} do not exist")
    chosen = np.random.default_rng(seed).choice(pool, size=len(reference.layers), replace=False)
    return blocks(model, [int(layer) for layer in chosen], "random")


def with_embeddings(model, selection: Selection) -> Selection:
    params = dict(model.named_parameters())
    return Selection(
        selection.strategy,
        {**selection.masks, **{name: None for name in EMBEDDINGS if name in params}},
        selection.layers,
        selection.neurons,
    )


def embeddings(model) -> Selection:
    """Only the token (= tied LM head) and position embeddings: the control for what `full` adds."""
    return with_embeddings(model, Selection("embeddings", {}))


def count(model, selection: Selection) -> dict:
    """Trainable entries vs all parameters (tied tensors counted once)."""
    params = dict(model.named_parameters())
    trainable = sum(
        params[name].numel() if mask is None else int(mask.sum()) for name, mask in selection.masks.items()
    )
    total = sum(p.numel() for p in params.values())
    return {"trainable": trainable, "total": total, "share": trainable / total}


class MaskedTraining:
    """Freeze what `selection` leaves out, exactly (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, selection: Selection):
        params = dict(model.named_parameters())
        unknown = sorted(set(selection.masks) - set(params))
        if unknown:
            raise ValueError(f"selection names parameters the model does not have: {unknown[:3]}")
        self.partial: list[tuple[Tensor, Tensor, Tensor]] = []
        self.handles = []
        for name, param in params.items():
            param.requires_grad_(name in selection.masks)
            mask = selection.masks.get(name)
            if mask is None:
                continue
            if mask.shape != param.shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}"
                )
            mask = mask.to(param.device)
            self.partial.append((param, mask, param.detach().clone()))
            # torch.where, not g * mask: a NaN/inf gradient in a frozen entry must not leak into Adam's
            # moments.
            self.handles.append(
                param.register_hook(lambda grad, mask=mask: torch.where(mask, grad, torch.zeros_like(grad)))
            )

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the unselected entries back (undoes weight decay on them). Call after each optimizer step."""
        for param, mask, frozen in self.partial:
            param.copy_(torch.where(mask, param, frozen))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
