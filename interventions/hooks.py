"""Interventions on our GPT-2 models, in a forward pass or in generation with the KV cache.

    with Intervener(model, clt, [FeatureEdit(layer=3, features=[17], mode="set", value=0.0),
                                 FeatureEdit(layer=3, features=[42], mode="scale", value=4.0,
                                 where=Where(start=12))]):
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
  Every edit but `FeatureEdit` implements the small `Edit` protocol (check + hook-point callbacks), so
  new edit kinds plug in without this module knowing them.
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

from training import hook_points
from training.errors import UserError

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
                raise ValueError(
                    f"patch values cover {value.shape[0]} positions, position {int(absolute.max())} was "
                    "reached"
                )
            return value[absolute]  # [T, units]
        if value.shape != (n_units,):
            raise ValueError(
                f"value must be a float, [{n_units}] or [positions, {n_units}], got {tuple(value.shape)}"
            )
    return value


class Edit:
    """The protocol every edit but `FeatureEdit` implements (SAEEdit in interventions/sae.py too):
    `check` refuses an edit the model cannot take, `named_hooks` returns the hook-point callbacks that
    apply it. `positions(length, device)` gives the absolute positions of the current call."""

    layer: int

    def check(self, points: hook_points.GPT2Adapter) -> None:
        if not 0 <= self.layer < points.n_layers:
            raise UserError(
                f"{type(self).__name__} at layer {self.layer}: the model has {points.n_layers} layers"
            )
        mode = getattr(self, "mode", "set")
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")

    def named_hooks(self, positions) -> list[tuple[str, hook_points.HookFn]]:
        raise NotImplementedError


@dataclass
class FeatureEdit:
    layer: int
    features: Sequence[int]
    mode: str = "set"
    value: float | Tensor = 0.0
    where: Where = field(default_factory=Where)


@dataclass
class NeuronEdit(Edit):
    layer: int
    neurons: Sequence[int]
    mode: str = "set"
    value: float | Tensor = 0.0
    where: Where = field(default_factory=Where)

    def check(self, points) -> None:
        super().check(points)
        bad = [u for u in self.neurons if not 0 <= u < points.d_mlp]
        if bad:
            raise UserError(f"neurons {bad} do not exist (layer {self.layer} has {points.d_mlp})")

    def named_hooks(self, positions):
        index = torch.tensor(list(self.neurons))

        def hook(post: Tensor) -> Tensor:
            absolute = positions(post.shape[1], post.device)
            mask = self.where.mask(absolute)[None, :, None]
            value = _value_at(self.value, absolute, len(index), post.dtype, post.device)
            post = post.clone()
            current = post[..., index.to(post.device)]
            post[..., index.to(post.device)] = torch.where(mask, _apply(self.mode, current, value), current)
            return post

        return [(f"blocks.{self.layer}.mlp.hook_post", hook)]


@dataclass
class ResidualAdd(Edit):
    layer: int  # added to the residual after this block
    vector: Float[Tensor, " d"]
    scale: float = 1.0
    where: Where = field(default_factory=Where)

    def check(self, points) -> None:
        super().check(points)
        if self.vector.shape != (points.d_model,):
            raise UserError(
                f"residual vector must have shape ({points.d_model},), got {tuple(self.vector.shape)}"
            )

    def named_hooks(self, positions):
        def hook(hidden: Tensor) -> Tensor:
            mask = self.where.mask(positions(hidden.shape[1], hidden.device))[None, :, None].to(hidden.dtype)
            return hidden + mask * (self.scale * self.vector.to(hidden))

        return [(f"blocks.{self.layer}.hook_resid_post", hook)]


class Intervener:
    """Context manager installing a list of edits as hook-point callbacks (see the module docstring).

    After a forward pass, `feature_values[(layer, feature)]` holds the edited features' values at the
    last call's positions [batch, pos] (what the replacement saw), for inspection and tests."""

    def __init__(self, model, clt=None, edits: Sequence = ()):
        self.model, self.clt, self.edits = model, clt, list(edits)
        self.points = hook_points.adapter(model)
        for edit in self.edits:
            if isinstance(edit, FeatureEdit):
                self._check_feature_edit(edit)
            else:
                edit.check(self.points)
        self._context = None
        self._offset = 0
        self._pending: dict[int, Tensor] = {}
        self._mlp_in: dict[int, Tensor] = {}
        self.feature_values: dict[tuple[int, int], Tensor] = {}

    def _check_feature_edit(self, edit: FeatureEdit) -> None:
        n_layers = self.points.n_layers
        if not 0 <= edit.layer < n_layers:
            raise UserError(f"FeatureEdit at layer {edit.layer}: the model has {n_layers} layers")
        if edit.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {edit.mode!r}")
        clt = self.clt
        if clt is None:
            raise UserError("FeatureEdit needs the CLT: Intervener(model, clt, edits)")
        if (clt.config.n_layers, clt.config.d_model) != (n_layers, self.points.d_model):
            raise UserError("the CLT does not match the model's layers / width")
        bad = [f for f in edit.features if not 0 <= f < clt.config.n_features]
        if bad:
            raise UserError(f"features {bad} do not exist (the CLT has {clt.config.n_features} per layer)")

    # --- positions ------------------------------------------------------------------------------

    def _track_positions(self, kwargs: dict) -> None:
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

    def named_hooks(self) -> list[tuple[str, hook_points.HookFn]]:
        named = [("hook_forward_kwargs", self._track_positions)]
        for layer in range(self.points.n_layers):
            feature_edits = [e for e in self.edits if isinstance(e, FeatureEdit) and e.layer == layer]
            if feature_edits:
                named.append((f"blocks.{layer}.ln2.hook_normalized", self._keep_mlp_in(layer)))
            # Every layer: earlier layers' feature edits write into later layers' MLP outputs.
            named.append((f"blocks.{layer}.hook_mlp_out", self._mlp_out_hook(layer, feature_edits)))
        for edit in self.edits:
            if not isinstance(edit, FeatureEdit):
                named += edit.named_hooks(self._absolute)
        return named

    def __enter__(self):
        self._context = hook_points.hooks(self.model, self.named_hooks())
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._pending.clear()
        self._mlp_in.clear()
        return self._context.__exit__(*exc)

    def _keep_mlp_in(self, layer: int):
        def hook(mlp_in: Tensor) -> None:
            self._mlp_in[layer] = mlp_in

        return hook

    def _mlp_out_hook(self, layer: int, edits: list[FeatureEdit]):
        def hook(output: Tensor) -> Tensor | None:
            if edits:
                self._edit_features(layer, edits, self._mlp_in.pop(layer))
            delta = self._pending.pop(layer, None)
            return None if delta is None else output + delta.to(output.dtype)

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
def freeze_attention(model, patterns: list[Tensor], prompt_only: bool = False):
    """Within the block, every attention layer uses the given patterns instead of its own softmax.

    prompt_only: in generation, freeze only the pass over the prompt (the one whose query/key lengths
    match the patterns); the generated tokens' own queries attend normally (seed 003 freezes attention
    on the prompt positions it edits — there is no clean pattern for a token the clean run never saw)."""
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    def frozen(module, query, key, value, attention_mask, **kwargs):
        weights = patterns[module.layer_idx].to(value.dtype)
        if weights.shape[-2:] != (query.shape[-2], key.shape[-2]):
            if prompt_only:
                return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
            raise ValueError(
                f"frozen patterns are for {tuple(weights.shape[-2:])} query/key positions, the run has "
                f"{(query.shape[-2], key.shape[-2])}: freezing applies to a forward pass over the same tokens"
            )
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
