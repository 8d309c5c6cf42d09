"""Interventions on our GPT-2 models, in a forward pass or in generation with the KV cache.

    with Intervener(model, clt, [FeatureEdit(layer=3, features=[17], mode="set", value=0.0),
                                 FeatureEdit(layer=3, features=[42], mode="scale", value=4.0, where=Where(start=12))]):
        model.generate(...)                                      # edits apply to prompt and generated tokens

Every edit targets absolute token positions (`Where`: all, a list, or every position from `start` on —
open-ended, so it keeps applying to generated tokens). Positions are tracked across KV-cache steps from
the cache length. Edits compose (applied in the order given) and every hook is removed on exit — the
model is unchanged afterwards.

- `FeatureEdit`: set / add to / multiply CLT features. At layer l's MLP the features are encoded from
  the MLP input (`clt.encode_layer`), edited, and the change Δa is written through the features'
  decoders: Δa · W_dec^{l→k} is added to the MLP output of every layer k ≥ l (all of them for a CLT,
  l only for a PLT). The error term of the replacement is untouched (circuit-tracer's convention).
- `NeuronEdit`: set / add / multiply MLP neurons after the activation function (LAPE (de)activation,
  or patching with values recorded from another input: a [position, neuron] tensor).
- `ResidualAdd`: add a vector to the residual stream after a block (difference-of-means steering).
- `interventions.sae.SAEEdit`: set / add / multiply latents of a residual SAE (sae-lens) after a block.
- `freeze_attention`: replay attention patterns recorded on a clean run (for a forward pass over the
  same tokens), so an edit's effect travels only through the residual / value paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

MODES = ("set", "add", "scale")


@dataclass(frozen=True)
class Where:
    """Absolute positions an edit applies to: `positions` (a list), else every position ≥ `start`
    (default 0: all positions, including generated ones)."""

    positions: tuple[int, ...] | None = None
    start: int = 0

    def mask(self, absolute: Tensor) -> Tensor:
        if self.positions is not None:
            return torch.isin(absolute, torch.tensor(self.positions, device=absolute.device))
        return absolute >= self.start


def _apply(mode: str, current: Tensor, value) -> Tensor:
    if mode == "set":
        return torch.as_tensor(value, dtype=current.dtype, device=current.device).expand_as(current).clone()
    if mode == "add":
        return current + value
    return current * value


def _value_at(value, absolute: Tensor, n_units: int, dtype, device):
    """A float, a per-unit vector [units], or per-position values [position, units] (patching)."""
    if isinstance(value, Tensor):
        value = value.to(device=device, dtype=dtype)
        if value.dim() == 2:
            if int(absolute.max()) >= value.shape[0]:
                raise ValueError(f"patch values cover {value.shape[0]} positions, position {int(absolute.max())} was reached")
            return value[absolute]  # [T, units]
        if value.shape != (n_units,):
            raise ValueError(f"value must be a float, [{n_units}] or [positions, {n_units}], got {tuple(value.shape)}")
    return value


@dataclass
class FeatureEdit:
    layer: int
    features: Sequence[int]
    mode: str = "set"
    value: float | Tensor = 0.0
    where: Where = field(default_factory=Where)


@dataclass
class NeuronEdit:
    layer: int
    neurons: Sequence[int]
    mode: str = "set"
    value: float | Tensor = 0.0
    where: Where = field(default_factory=Where)


@dataclass
class ResidualAdd:
    layer: int  # added to the residual after this block
    vector: Float[Tensor, "d"]
    scale: float = 1.0
    where: Where = field(default_factory=Where)


class Intervener:
    """Context manager installing a list of edits as forward hooks (see the module docstring).

    After a forward pass, `feature_values[(layer, feature)]` holds the edited features' values at the
    last call's positions [batch, pos] (what the replacement saw), for inspection and tests."""

    def __init__(self, model, clt=None, edits: Sequence = ()):
        self.model, self.clt, self.edits = model, clt, list(edits)
        self.blocks = model.transformer.h
        n_layers = len(self.blocks)
        for edit in self.edits:
            if not 0 <= edit.layer < n_layers:
                raise ValueError(f"{type(edit).__name__} at layer {edit.layer}: the model has {n_layers} layers")
            mode = getattr(edit, "mode", "set")
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            if isinstance(edit, FeatureEdit):
                if clt is None:
                    raise ValueError("FeatureEdit needs the CLT: Intervener(model, clt, edits)")
                if (clt.config.n_layers, clt.config.d_model) != (n_layers, model.config.n_embd):
                    raise ValueError("the CLT does not match the model's layers / width")
                bad = [f for f in edit.features if not 0 <= f < clt.config.n_features]
                if bad:
                    raise ValueError(f"features {bad} do not exist (the CLT has {clt.config.n_features} per layer)")
            if isinstance(edit, NeuronEdit):
                n = self.blocks[edit.layer].mlp.c_fc.nf
                bad = [u for u in edit.neurons if not 0 <= u < n]
                if bad:
                    raise ValueError(f"neurons {bad} do not exist (layer {edit.layer} has {n})")
            if isinstance(edit, ResidualAdd) and edit.vector.shape != (model.config.n_embd,):
                raise ValueError(f"residual vector must have shape ({model.config.n_embd},), got {tuple(edit.vector.shape)}")
        self._handles = []
        self._offset = 0
        self._pending: dict[int, Tensor] = {}
        self.feature_values: dict[tuple[int, int], Tensor] = {}

    # --- positions ------------------------------------------------------------------------------

    def _track_positions(self, module, args, kwargs):
        past = kwargs.get("past_key_values")
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            self._offset = int(cache_position[0])
        elif past is not None and hasattr(past, "get_seq_length"):
            self._offset = int(past.get_seq_length())
        else:
            self._offset = 0
        self._pending.clear()

    def _absolute(self, length: int, device) -> Tensor:
        return torch.arange(self._offset, self._offset + length, device=device)

    # --- hooks ----------------------------------------------------------------------------------

    def __enter__(self):
        transformer = self.model.transformer
        self._handles.append(transformer.register_forward_pre_hook(self._track_positions, with_kwargs=True))
        for layer, block in enumerate(self.blocks):
            feature_edits = [e for e in self.edits if isinstance(e, FeatureEdit) and e.layer == layer]
            self._handles.append(block.mlp.register_forward_hook(self._mlp_hook(layer, feature_edits)))
            neuron_edits = [e for e in self.edits if isinstance(e, NeuronEdit) and e.layer == layer]
            if neuron_edits:
                self._handles.append(block.mlp.act.register_forward_hook(self._neuron_hook(neuron_edits)))
            residual_edits = [e for e in self.edits if isinstance(e, ResidualAdd) and e.layer == layer]
            if residual_edits:
                self._handles.append(block.register_forward_hook(self._residual_hook(residual_edits)))
            for edit in self.edits:
                if type(edit).__name__ == "SAEEdit" and edit.layer == layer:
                    from interventions.sae import sae_edit_hook

                    self._handles.append(block.register_forward_hook(sae_edit_hook(edit, self._absolute)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _mlp_hook(self, layer: int, edits: list[FeatureEdit]):
        def hook(module, args, output):
            if edits:
                self._edit_features(layer, edits, args[0])
            delta = self._pending.pop(layer, None)
            return output if delta is None else output + delta.to(output.dtype)
        return hook

    @torch.no_grad()
    def _edit_features(self, layer: int, edits: list[FeatureEdit], mlp_in: Tensor) -> None:
        clt = self.clt
        s_in = clt.input_scale[layer]
        acts = clt.encode_layer(mlp_in.to(clt.W_enc.dtype) * s_in, layer)  # [B, T, F]
        absolute = self._absolute(mlp_in.shape[1], mlp_in.device)
        edited = acts.clone()
        for edit in edits:
            index = torch.tensor(list(edit.features), device=acts.device)
            mask = edit.where.mask(absolute)[None, :, None]
            value = _value_at(edit.value, absolute, len(index), acts.dtype, acts.device)
            current = edited[..., index]
            edited[..., index] = torch.where(mask, _apply(edit.mode, current, value), current)
            for i, feature in enumerate(edit.features):
                self.feature_values[(layer, int(feature))] = edited[..., feature].detach().clone()
        delta = edited - acts  # [B, T, F], non-zero only at edited features and positions
        changed = delta.abs().sum((0, 1)) > 0
        if not changed.any():
            return
        features = changed.nonzero()[:, 0]
        decoders = clt.W_dec[layer][features]  # [f, targets, d] (normalised units)
        for t in range(decoders.shape[1]):
            target = layer + t
            contribution = (delta[..., features] @ decoders[:, t]) / clt.output_scale[target]
            self._pending[target] = self._pending.get(target, 0) + contribution

    def _neuron_hook(self, edits: list[NeuronEdit]):
        def hook(module, args, output):
            absolute = self._absolute(output.shape[1], output.device)
            output = output.clone()
            for edit in edits:
                index = torch.tensor(list(edit.neurons), device=output.device)
                mask = edit.where.mask(absolute)[None, :, None]
                value = _value_at(edit.value, absolute, len(index), output.dtype, output.device)
                current = output[..., index]
                output[..., index] = torch.where(mask, _apply(edit.mode, current, value), current)
            return output
        return hook

    def _residual_hook(self, edits: list[ResidualAdd]):
        def hook(module, args, output):
            hidden = output[0]
            absolute = self._absolute(hidden.shape[1], hidden.device)
            for edit in edits:
                mask = edit.where.mask(absolute)[None, :, None].to(hidden.dtype)
                hidden = hidden + mask * (edit.scale * edit.vector.to(hidden))
            return (hidden,) + tuple(output[1:])
        return hook


# --- frozen attention ----------------------------------------------------------------------------

_FROZEN = "mlclt_frozen_attention"


@torch.no_grad()
def record_patterns(model, input_ids: Tensor) -> list[Tensor]:
    """Attention patterns [batch, head, query, key] of every layer on a clean run."""
    patterns = {}
    with _attention_implementation(model, _recording(patterns)):
        model(input_ids=input_ids)
    return [patterns[layer] for layer in range(len(model.transformer.h))]


@contextmanager
def freeze_attention(model, patterns: list[Tensor]):
    """Within the block, every attention layer uses the given patterns instead of its own softmax."""
    def frozen(module, query, key, value, attention_mask, **kwargs):
        weights = patterns[module.layer_idx].to(value.dtype)
        if weights.shape[-2:] != (query.shape[-2], key.shape[-2]):
            raise ValueError(f"frozen patterns are for {tuple(weights.shape[-2:])} query/key positions, the run has "
                             f"{(query.shape[-2], key.shape[-2])}: freezing applies to a forward pass over the same tokens")
        return torch.matmul(weights, value).transpose(1, 2), weights
    with _attention_implementation(model, frozen):
        yield


def _recording(store: dict):
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    def record(module, query, key, value, attention_mask, **kwargs):
        output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        store[module.layer_idx] = weights.detach()
        return output, weights
    return record


@contextmanager
def _attention_implementation(model, function):
    from transformers import AttentionInterface

    AttentionInterface.register(_FROZEN, function)
    previous = model.config._attn_implementation
    model.config._attn_implementation = _FROZEN
    try:
        yield
    finally:
        model.config._attn_implementation = previous
