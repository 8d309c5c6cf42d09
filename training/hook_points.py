"""Named hook points: the one place that knows where things live inside a model.

Every reader or editor of activations (activation collection, CLT evaluation, interventions, lenses,
LAPE, attribution) names what it wants with TransformerLens-style names and gets a callback on it:

    with hook_points.hooks(model, [("blocks.2.mlp.hook_post", fn)]):
        model(input_ids=ids)

`fn(tensor)` receives the activation and returns either None (read only) or a tensor of the same
shape that replaces it downstream. Hooks are removed on exit, so the model is unchanged afterwards.

| name                              | HF GPT-2 module               | what it carries                       |
|-----------------------------------|-------------------------------|---------------------------------------|
| `blocks.{l}.hook_resid_pre`       | input of `transformer.h[l]`   | residual before block l               |
| `blocks.{l}.ln1.hook_normalized`  | output of `h[l].ln_1`         | attention input                       |
| `blocks.{l}.hook_resid_mid`       | input of `h[l].ln_2`          | residual after attention              |
| `blocks.{l}.ln2.hook_normalized`  | output of `h[l].ln_2`         | MLP input (what a transcoder reads)   |
| `blocks.{l}.mlp.hook_post`        | output of `h[l].mlp.act`      | MLP neurons after the nonlinearity    |
| `blocks.{l}.hook_mlp_out`         | output of `h[l].mlp`          | MLP output (what a transcoder writes) |
| `blocks.{l}.hook_resid_post`      | output[0] of `h[l]`           | residual after block l                |
| `ln_final.hook_input`             | input of `transformer.ln_f`   | residual entering the unembedding     |
| `hook_forward_kwargs`             | call of `transformer`         | its keyword arguments (read only)     |

A second architecture means one more adapter class with the same `point`, `n_layers`, `d_model` and
`d_mlp`, registered in `ADAPTERS` under its `config.model_type`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from torch import Tensor, nn

from training.errors import UserError

HookFn = Callable[[Tensor], "Tensor | None"]

_LAYER_POINT = re.compile(
    r"blocks\.(\d+)\.(hook_resid_pre|ln1\.hook_normalized|hook_resid_mid|ln2\.hook_normalized|"
    r"mlp\.hook_post|hook_mlp_out|hook_resid_post)"
)


class GPT2Adapter:
    """Hook points of a Hugging Face `GPT2LMHeadModel` (or its body, `GPT2Model`)."""

    def __init__(self, model: nn.Module):
        self.body = getattr(model, "transformer", model)
        self.blocks = self.body.h

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.body.config.n_embd

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].mlp.c_fc.nf

    def point(self, name: str) -> tuple[nn.Module, str]:
        """(module, kind): kind "output" (forward hook), "input" (pre-hook on the first argument), "block"
        (the first element of a block's output tuple) or "kwargs" (read the call's keyword arguments)."""
        if name == "hook_forward_kwargs":
            return self.body, "kwargs"
        if name == "ln_final.hook_input":
            return self.body.ln_f, "input"
        match = _LAYER_POINT.fullmatch(name)
        if match is None:
            raise UserError(
                f"unknown hook point {name!r}; known: blocks.L.{{hook_resid_pre, ln1.hook_normalized, "
                "hook_resid_mid, ln2.hook_normalized, mlp.hook_post, hook_mlp_out, hook_resid_post}, "
                "ln_final.hook_input, hook_forward_kwargs"
            )
        layer, suffix = int(match.group(1)), match.group(2)
        if not 0 <= layer < self.n_layers:
            raise UserError(f"hook point {name!r}: the model has {self.n_layers} layers")
        block = self.blocks[layer]
        return {
            "hook_resid_pre": (block, "input"),
            "ln1.hook_normalized": (block.ln_1, "output"),
            "hook_resid_mid": (block.ln_2, "input"),
            "ln2.hook_normalized": (block.ln_2, "output"),
            "mlp.hook_post": (block.mlp.act, "output"),
            "hook_mlp_out": (block.mlp, "output"),
            "hook_resid_post": (block, "block"),
        }[suffix]


ADAPTERS = {"gpt2": GPT2Adapter}


def adapter(model: nn.Module) -> GPT2Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(
            f"no hook adapter for model type {model_type!r} (have {sorted(ADAPTERS)}): "
            "add one in training/hook_points.py"
        )
    return ADAPTERS[model_type](model)


def _register(module: nn.Module, kind: str, fn: HookFn):
    if kind == "output":

        def on_output(mod, args, output):
            return fn(output)

        return module.register_forward_hook(on_output)
    if kind == "block":

        def on_block_output(mod, args, output):
            replaced = fn(output[0])
            return None if replaced is None else (replaced,) + tuple(output[1:])

        return module.register_forward_hook(on_block_output)
    if kind == "input":

        def on_input(mod, args, kwargs):
            # HF calls blocks with hidden_states positionally today; accept the keyword form too.
            positional = len(args) > 0
            value = args[0] if positional else kwargs["hidden_states"]
            replaced = fn(value)
            if replaced is None:
                return None
            if positional:
                return (replaced,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replaced}

        return module.register_forward_pre_hook(on_input, with_kwargs=True)
    if kind == "kwargs":

        def on_call(mod, args, kwargs):
            fn(kwargs)

        return module.register_forward_pre_hook(on_call, with_kwargs=True)
    raise AssertionError(kind)


@contextmanager
def hooks(model: nn.Module, named_fns: Iterable[tuple[str, HookFn]]):
    """Install `(name, fn)` hooks in the order given (several per name compose); remove them on exit."""
    points = adapter(model)
    handles = []
    try:
        for name, fn in named_fns:
            module, kind = points.point(name)
            handles.append(_register(module, kind, fn))
        yield points
    finally:
        for handle in handles:
            handle.remove()


def layer_names(template: str, n_layers: int) -> list[str]:
    """`template` with `{l}` filled for every layer, e.g. layer_names("blocks.{l}.hook_mlp_out", 4)."""
    return [template.format(l=layer) for layer in range(n_layers)]


def record_layers(model: nn.Module, template: str, **forward_kwargs) -> Tensor:
    """One forward pass of the model body; the hook point `template` (with `{l}`) of every layer,
    stacked as [layer, ...]. E.g. record_layers(model, "blocks.{l}.hook_resid_post", input_ids=ids)."""
    import torch

    n_layers = adapter(model).n_layers
    seen: dict[int, Tensor] = {}
    named = [
        (name, lambda value, layer=layer: seen.__setitem__(layer, value))
        for layer, name in enumerate(layer_names(template, n_layers))
    ]
    with hooks(model, named):
        getattr(model, "transformer", model)(**forward_kwargs)
    return torch.stack([seen[layer] for layer in range(n_layers)])
