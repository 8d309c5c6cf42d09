"""CLT training objective (docs/methods.md §1), on normalised activations:

    L = Σ_k E‖ŷ^k − y^k‖²  +  λ · E Σ_{l,i} tanh(c · a_i^l · ‖W_dec,i^l‖)  +  μ · E Σ_{l,i} relu(θ_i^l −
    z_i^l) · ‖W_dec,i^l‖

The last (pre-activation) term pushes dead JumpReLU features' pre-activations up towards their
thresholds; it is only used with JumpReLU. TopK variants fix L0 and use λ = μ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from clt.model import CrossLayerTranscoder


@dataclass
class LossTerms:
    total: Tensor
    reconstruction: Tensor
    sparsity: Tensor
    preactivation: Tensor
    mse_per_layer: Float[Tensor, " layer"]
    acts: Float[Tensor, "batch layer feature"]
    reconstruction_out: Float[Tensor, "batch layer d"]


def clt_loss(
    clt: CrossLayerTranscoder,
    x: Float[Tensor, "batch layer d"],
    y: Float[Tensor, "batch layer d"],
    sparsity_coefficient: float,
    preact_coefficient: float,
    tanh_scale: float = 4.0,
    sparse_decode: bool | None = None,
    forward=None,
) -> LossTerms:
    """x, y are normalised activations (already multiplied by the transcoder's scales). `forward` is the
    module to call (e.g. the DDP wrapper of `clt`, so that gradients are all-reduced); default `clt`."""
    y_hat, acts, pre = (forward or clt)(x, sparse=sparse_decode)
    mse_per_layer = (y_hat - y).pow(2).sum(-1).mean(0)
    reconstruction = mse_per_layer.sum()
    zero = torch.zeros((), device=x.device)
    sparsity = preactivation = zero
    if sparsity_coefficient > 0 or preact_coefficient > 0:
        norms = clt.decoder_norms()  # [layer, feature], broadcast over the batch below
        if sparsity_coefficient > 0:
            sparsity = torch.tanh(tanh_scale * acts * norms[None]).sum(dim=(1, 2)).mean()
        if preact_coefficient > 0 and clt.config.activation == "jumprelu":
            preactivation = (torch.relu(clt.threshold[None] - pre) * norms[None]).sum(dim=(1, 2)).mean()
    total = reconstruction + sparsity_coefficient * sparsity + preact_coefficient * preactivation
    return LossTerms(
        total, reconstruction, sparsity, preactivation, mse_per_layer.detach(), acts.detach(), y_hat.detach()
    )


def fraction_of_variance_unexplained(
    y: Float[Tensor, "batch layer d"], y_hat: Float[Tensor, "batch layer d"]
) -> Float[Tensor, " layer"]:
    """FVU per layer: ‖y − ŷ‖² / ‖y − ȳ‖² summed over the batch."""
    residual = (y - y_hat).pow(2).sum(dim=(0, 2))
    variance = (y - y.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return residual / variance.clamp_min(1e-12)
