"""The frozen, linear GPT-2 of one prompt (docs/methods.md §3).

Attribution works on the *local replacement model*: for one prompt, attention patterns and LayerNorm
scales are frozen at their values on that prompt and every MLP output is a constant (CLT features'
decoder vectors + an error node + b_dec). What is left is linear in the residual stream:

    r_0 = E[tok] + P                      (token nodes E[tok], positional embeddings are a constant)
    x   = LN1(r_l)  = C r_l / s1 ⊙ w1 + b1   C = centring, s1 frozen per position
    m_l = r_l + Σ_h A_h (x W_V,h + b_V,h) W_O,h + b_O     A_h frozen
    mlp_in_l = LN2(m_l)                   ← CLT encoders read here
    r_{l+1} = m_l + mlp_out_l             ← CLT decoders / error nodes write here
    logits = LN_f(r_L) W_Eᵀ

`FrozenGPT2.capture` records the frozen quantities from the real HF model; `forward` runs the frozen
model for arbitrary constant MLP outputs and token embeddings (used to test that freezing reproduces
the real model and that edges sum to targets); `backward` is its exact transpose, batched over many
targets at once — the gradient every attribution edge is read from. HF's modules do not expose the
LayerNorm scales and attention patterns as replaceable constants, hence this small re-statement of the
GPT-2 block; `tests/test_attribution.py` checks it against the HF model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor

from clt.recorder import MLPActivationRecorder
from training import hook_points


@dataclass
class FrozenGPT2:
    """Weights of one GPT-2 plus everything frozen on one prompt (all in one dtype)."""

    tokens: Int[Tensor, " pos"]
    token_embeddings: Float[Tensor, "pos d"]  # W_E[tokens]: the token nodes' vectors
    position_embeddings: Float[Tensor, "pos d"]
    ln1_scale: Float[Tensor, "layer pos"]
    ln2_scale: Float[Tensor, "layer pos"]
    lnf_scale: Float[Tensor, " pos"]
    patterns: Float[Tensor, "layer head pos pos"]
    mlp_in: Float[Tensor, "layer pos d"]
    mlp_out: Float[Tensor, "layer pos d"]
    last_logits: Float[Tensor, " vocab"]  # the next-token logits at the last position (the targets')
    # weights
    ln1_w: Float[Tensor, "layer d"]
    ln1_b: Float[Tensor, "layer d"]
    ln2_w: Float[Tensor, "layer d"]
    ln2_b: Float[Tensor, "layer d"]
    lnf_w: Float[Tensor, " d"]
    lnf_b: Float[Tensor, " d"]
    W_V: Float[Tensor, "layer d hd"]  # value part of c_attn (heads concatenated)
    b_V: Float[Tensor, "layer hd"]
    W_O: Float[Tensor, "layer hd d"]
    b_O: Float[Tensor, "layer d"]
    W_U: Float[Tensor, "d vocab"]
    n_heads: int

    @property
    def n_layers(self) -> int:
        return self.mlp_in.shape[0]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    @torch.no_grad()
    def capture(cls, model, tokens: Int[Tensor, " pos"], dtype: torch.dtype = torch.float32) -> FrozenGPT2:
        """Run `model` (a GPT2LMHeadModel) on `tokens` and freeze what attribution must hold fixed."""
        check_supported(model)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.numel() > model.config.n_positions:
            raise ValueError(
                f"prompt has {tokens.numel()} tokens, the model's context is {model.config.n_positions}"
            )
        transformer = model.transformer
        device = next(model.parameters()).device
        tokens = tokens.to(device)
        eps = model.config.layer_norm_epsilon
        ln_inputs: dict[str, Tensor] = {}

        def keep(key: str):
            return lambda tensor: ln_inputs.__setitem__(key, tensor[0])

        named = [(f"blocks.{l}.hook_resid_pre", keep(f"ln_1.{l}")) for l in range(len(transformer.h))]
        named += [(f"blocks.{l}.hook_resid_mid", keep(f"ln_2.{l}")) for l in range(len(transformer.h))]
        named.append(("ln_final.hook_input", keep("ln_f")))
        with hook_points.hooks(model, named), MLPActivationRecorder(model) as recorder:
            # the body only, and the unembedding at the last position: attribution reads no other logits,
            # and [pos, vocab] of them was a tenth of a short prompt's time (a 1,024-token one's 64 MB)
            hidden = transformer(input_ids=tokens[None]).last_hidden_state[0]
            last_logits = model.lm_head(hidden[-1])
            mlp_in, mlp_out = recorder.stacked()

        def scale(x: Tensor) -> Tensor:
            return (x.double().var(-1, unbiased=False) + eps).sqrt()

        L, d, H = len(transformer.h), model.config.n_embd, model.config.n_head
        patterns = []
        for layer, block in enumerate(transformer.h):
            x = block.ln_1(ln_inputs[f"ln_1.{layer}"]).double()
            q, k, _ = (x @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()).split(
                d, dim=-1
            )
            q, k = (rearrange(t, "p (h e) -> h p e", h=H) for t in (q, k))
            scores = einsum(q, k, "h i e, h j e -> h i j") / (d // H) ** 0.5
            causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=device).tril()
            patterns.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))

        def weights(fn) -> Tensor:
            return torch.stack([fn(block).detach() for block in transformer.h]).to(dtype)

        return cls(
            tokens=tokens,
            token_embeddings=transformer.wte.weight.detach()[tokens].to(dtype),
            position_embeddings=transformer.wpe.weight.detach()[: len(tokens)].to(dtype),
            ln1_scale=torch.stack([scale(ln_inputs[f"ln_1.{l}"]) for l in range(L)]).to(dtype),
            ln2_scale=torch.stack([scale(ln_inputs[f"ln_2.{l}"]) for l in range(L)]).to(dtype),
            lnf_scale=scale(ln_inputs["ln_f"]).to(dtype),
            patterns=torch.stack(patterns).to(dtype),
            mlp_in=rearrange(mlp_in[0], "p l d -> l p d").to(dtype),
            mlp_out=rearrange(mlp_out[0], "p l d -> l p d").to(dtype),
            last_logits=last_logits.to(dtype),
            ln1_w=weights(lambda b: b.ln_1.weight),
            ln1_b=weights(lambda b: b.ln_1.bias),
            ln2_w=weights(lambda b: b.ln_2.weight),
            ln2_b=weights(lambda b: b.ln_2.bias),
            lnf_w=transformer.ln_f.weight.detach().to(dtype),
            lnf_b=transformer.ln_f.bias.detach().to(dtype),
            W_V=weights(lambda b: b.attn.c_attn.weight[:, 2 * d :]),
            b_V=weights(lambda b: b.attn.c_attn.bias[2 * d :]),
            W_O=weights(lambda b: b.attn.c_proj.weight),
            b_O=weights(lambda b: b.attn.c_proj.bias),
            W_U=model.lm_head.weight.detach().T.to(dtype),
            n_heads=H,
        )

    # --- frozen forward ---------------------------------------------------------------------------

    def forward(
        self, token_embeddings: Float[Tensor, "pos d"], mlp_out: Float[Tensor, "layer pos d"]
    ) -> tuple[Float[Tensor, "layer pos d"], Float[Tensor, "pos d"]]:
        """MLP inputs of every layer and the final normalised residual (what the unembedding reads) of
        the frozen model whose token embeddings and MLP outputs are the given constants."""
        r = token_embeddings + self.position_embeddings
        mlp_in = []
        for layer in range(self.n_layers):
            x = _layer_norm(r, self.ln1_scale[layer], self.ln1_w[layer], self.ln1_b[layer])
            v = rearrange(x @ self.W_V[layer] + self.b_V[layer], "p (h e) -> h p e", h=self.n_heads)
            z = rearrange(einsum(self.patterns[layer], v, "h i j, h j e -> h i e"), "h p e -> p (h e)")
            m = r + z @ self.W_O[layer] + self.b_O[layer]
            mlp_in.append(_layer_norm(m, self.ln2_scale[layer], self.ln2_w[layer], self.ln2_b[layer]))
            r = m + mlp_out[layer]
        return torch.stack(mlp_in), _layer_norm(r, self.lnf_scale, self.lnf_w, self.lnf_b)

    # --- its transpose ----------------------------------------------------------------------------

    def backward(
        self,
        reads: list[tuple[int, Int[Tensor, " batch"], Int[Tensor, " batch"], Float[Tensor, "batch d"]]],
        batch: int,
        n_pos: int,
        top_layer: int,
    ) -> tuple[list[Float[Tensor, "batch pos d"] | None], Float[Tensor, "batch pos d"]]:
        """Gradients of `batch` linear read-outs with respect to every MLP output and token embedding.

        `reads` lists (layer, batch rows, positions, vectors): row b reads `vector · mlp_in[layer, pos]`,
        or `vector · final[pos]` for layer == n_layers (logit directions). Only positions < `n_pos`
        are computed (causality: nothing at a later position can affect an earlier read), and layers
        above `top_layer` are skipped (nothing there is read). Returns the gradient at each layer's MLP
        output (None for layers ≥ top_layer, where it is zero) and at the token embeddings."""
        d = self.W_U.shape[0]
        grad = torch.zeros(batch, n_pos, d, dtype=self.W_U.dtype, device=self.W_U.device)
        for layer, rows, positions, vectors in reads:
            if layer == self.n_layers:
                grad[rows, positions] += _layer_norm_transpose(vectors, self.lnf_scale[positions], self.lnf_w)
        grad_mlp_out: list[Tensor | None] = [None] * self.n_layers
        first = min(top_layer, self.n_layers - 1)
        entries = [(r, p, v) for read_layer, r, p, v in reads if read_layer == first]
        if top_layer < self.n_layers and entries:
            # Only features read: at the top layer the gradient is the reads alone, one position per row,
            # so its attention transpose is taken on those rows (`_sparse_attention_transpose`), not on
            # batch × positions rows that are all zero but one. (Its MLP output gets no gradient.)
            rows = torch.cat([r for r, _, _ in entries])
            positions = torch.cat([p for _, p, _ in entries])
            grad_m = _layer_norm_transpose(
                torch.cat([v for _, _, v in entries]), self.ln2_scale[first, positions], self.ln2_w[first]
            )
            grad[rows, positions] += grad_m  # (r_l reaches m_l directly)
            grad.index_add_(0, rows, self._sparse_attention_transpose(grad_m, positions, first, n_pos))
            first -= 1
        for layer in range(first, -1, -1):
            grad_mlp_out[layer] = grad  # r_{l+1} = m_l + mlp_out_l
            injected = [
                (rows, positions, vectors)
                for read_layer, rows, positions, vectors in reads
                if read_layer == layer
            ]
            if injected:
                grad = grad.clone()  # the MLP-output gradient above must not see reads at this layer's input
                for rows, positions, vectors in injected:
                    grad[rows, positions] += _layer_norm_transpose(
                        vectors, self.ln2_scale[layer, positions], self.ln2_w[layer]
                    )
            grad = grad + self._attention_transpose(grad, layer, n_pos)
        return grad_mlp_out, grad

    # The transpose of LN1 (C diag(w) / s, C the centring) is folded into the two things the attention
    # transpose already multiplies by: diag(w) and C into the value matrix, 1/s into the patterns' key
    # columns — three elementwise passes over [batch, pos, d] per layer fewer, a tenth of a short
    # prompt's time. Both are computed on the first backward pass and kept.

    @cached_property
    def _value_transpose(self) -> Float[Tensor, "layer hd d"]:
        """W_Vᵀ diag(w₁) C: from a value gradient to the (unscaled) gradient at the residual."""
        folded = self.W_V.transpose(1, 2) * self.ln1_w[:, None, :]
        return folded - folded.mean(-1, keepdim=True)  # (× C centres each row)

    @cached_property
    def _scaled_patterns(self) -> Float[Tensor, "layer head pos pos"]:
        """Patterns with each key column j divided by LN1's frozen scale at j."""
        return self.patterns / self.ln1_scale[:, None, None, :]

    def _attention_transpose(
        self, grad: Float[Tensor, "batch pos d"], layer: int, n_pos: int
    ) -> Float[Tensor, "batch pos d"]:
        """Gradient reaching r_l through LN1 and attention (patterns and scale frozen).

        Per head, the pattern's transpose multiplies the whole batch at once: the batch is folded into
        the matmul's columns ([j, i] @ [i, batch·head_dim]), one large product per head instead of
        batch × heads small ones."""
        batch = grad.shape[0]
        grad_z = rearrange(grad @ self.W_O[layer].T, "b p (h e) -> h p (b e)", h=self.n_heads)
        pattern = self._scaled_patterns[layer, :, :n_pos, :n_pos]
        grad_v = torch.bmm(pattern.transpose(1, 2), grad_z)  # [head, j, batch·e]
        return rearrange(grad_v, "h p (b e) -> b p (h e)", b=batch) @ self._value_transpose[layer]

    def _sparse_attention_transpose(
        self, grad_m: Float[Tensor, "m d"], positions: Int[Tensor, " m"], layer: int, n_pos: int
    ) -> Float[Tensor, "m pos d"]:
        """`_attention_transpose` of gradients that are zero except at one position per row (`grad_m`
        at `positions`): the value gradient at position j is the pattern weight P[h, pos, j] times the
        row's own per-head vector, so the two d × d products act on m rows instead of m × pos."""
        value = rearrange(self._value_transpose[layer], "(h e) d -> h e d", h=self.n_heads)
        grad_z = rearrange(grad_m @ self.W_O[layer].T, "m (h e) -> h m e", h=self.n_heads)
        per_head = torch.bmm(grad_z, value)  # [head, m, d]: each head's share, before mixing positions
        weights = rearrange(self._scaled_patterns[layer][:, positions, :n_pos], "h m j -> m j h")
        return torch.bmm(weights, rearrange(per_head, "h m d -> m h d"))


def check_supported(model) -> None:
    config = model.config
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(
            f"attribution supports GPT-2 models (GPT2LMHeadModel); got model_type={config.model_type!r}"
        )
    if (
        config.scale_attn_by_inverse_layer_idx
        or not config.scale_attn_weights
        or config.reorder_and_upcast_attn
    ):
        raise ValueError(
            "attribution supports GPT-2's standard attention scaling only "
            "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)"
        )


def _layer_norm(
    x: Float[Tensor, "pos d"],
    scale: Float[Tensor, " pos"],
    weight: Float[Tensor, " d"],
    bias: Float[Tensor, " d"],
) -> Float[Tensor, "pos d"]:
    """LayerNorm with its scale frozen: linear in x (plus the bias)."""
    return (x - x.mean(-1, keepdim=True)) / scale[:, None] * weight + bias


def _layer_norm_transpose(
    grad: Float[Tensor, "... pos d"], scale: Float[Tensor, " pos"], weight: Float[Tensor, " d"]
) -> Float[Tensor, "... pos d"]:
    """Transpose of the frozen LayerNorm's linear part: C diag(w) / s, C the (symmetric) centring."""
    g = grad * (weight / scale[..., None])  # the [pos, d] factor first: one pass over the batch, not two
    return g.sub_(g.mean(-1, keepdim=True))
