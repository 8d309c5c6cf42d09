"""Cross-layer transcoder (CLT) and per-layer transcoder (PLT).

Layer l reads the MLP input x^l and writes to the MLP outputs of layer l and every later layer
(CLT), or of layer l only (PLT):

    a^l = act(x^l W_enc^l + b_enc^l)                       W_enc^l: [d, F]
    ŷ^k = Σ_{l ≤ k} a^l W_dec^{l→k} + b_dec^k (+ x^k W_skip^k)

Decoders are stored per source layer as `W_dec[l]: [F, n_targets(l), d]` with n_targets = L − l for a
CLT (targets l … L−1) and 1 for a PLT — circuit-tracer's layout, so export is a transpose away.
Training happens on normalised activations (`input_scale`, `output_scale` per layer, docs/methods.md §1);
`clt.export` folds the scales into the weights so exported transcoders act on raw activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn

ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")


@dataclass
class CLTOptions:
    """The transcoder's shape and activation, as a user chooses them (the model fixes layers and width)."""

    n_features: int = field(default=512, metadata={"help": "features per layer"})
    activation: str = field(default="jumprelu", metadata={"help": "jumprelu, topk, batchtopk or relu"})
    k: int = field(
        default=16, metadata={"help": "k for topk/batchtopk (active features per token and layer)"}
    )
    cross_layer: bool = field(
        default=True, metadata={"help": "decoders write to every later layer; false = per-layer transcoder"}
    )
    skip: bool = field(default=False, metadata={"help": "add a linear skip connection per layer"})
    threshold_init: float = field(
        default=0.03, metadata={"help": "initial JumpReLU threshold (normalised units)"}
    )
    bandwidth: float = field(default=1.0, metadata={"help": "JumpReLU straight-through rectangle width ε"})


@dataclass
class CLTConfig(CLTOptions):
    """A transcoder's full configuration: the options plus the model's layers and width."""

    n_layers: int = 0
    d_model: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if min(self.n_layers, self.d_model, self.n_features) < 1:
            raise ValueError(f"n_layers, d_model and n_features must be positive: {self}")

    @classmethod
    def for_model(cls, options: CLTOptions, n_layers: int, d_model: int) -> "CLTConfig":
        return cls(**asdict(options), n_layers=n_layers, d_model=d_model)

    def to_dict(self) -> dict:
        return asdict(self)


class JumpReLU(torch.autograd.Function):
    """a = z · 1[z > θ], with the straight-through estimator of Rajamanoharan et al. (2024) for θ:

    ∂a/∂z = 1[z > θ],   ∂a/∂θ = −(θ/ε) · rect((z − θ)/ε),   rect(u) = 1[|u| < 1/2].
    """

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_output * (z > threshold)
        in_window = ((z - threshold).abs() < eps / 2).to(grad_output.dtype)
        grad_threshold = -(threshold / eps) * in_window * grad_output
        # θ was broadcast over the leading (batch) dimensions: sum them back out.
        while grad_threshold.dim() > threshold.dim():
            grad_threshold = grad_threshold.sum(0)
        return grad_z, grad_threshold, None


def topk_activation(pre: Float[Tensor, "... feature"], k: int) -> Float[Tensor, "... feature"]:
    """Keep the k largest (ReLU'd) activations along the feature dimension."""
    values, indices = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def batch_topk_activation(
    pre: Float[Tensor, "batch layer feature"], k: int
) -> Float[Tensor, "batch layer feature"]:
    """Per layer, keep the k·batch largest activations across the whole batch (Bussmann et al. 2024)."""
    batch, n_layers, n_features = pre.shape
    flat = torch.relu(pre).permute(1, 0, 2).reshape(n_layers, batch * n_features)
    values, indices = flat.topk(min(k * batch, flat.shape[1]), dim=-1)
    kept = torch.zeros_like(flat).scatter(-1, indices, values)
    return kept.reshape(n_layers, batch, n_features).permute(1, 0, 2)


class CrossLayerTranscoder(nn.Module):
    def __init__(self, config: CLTConfig):
        super().__init__()
        self.config = config
        L, d, F = config.n_layers, config.d_model, config.n_features
        self.W_enc = nn.Parameter(torch.empty(L, d, F).uniform_(-(F**-0.5), F**-0.5))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.log_threshold = nn.Parameter(
            torch.full((L, F), float(torch.log(torch.tensor(config.threshold_init))))
        )
        decoder_bound = (L * d) ** -0.5 if config.cross_layer else d**-0.5
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.empty(F, self.n_targets(l), d).uniform_(-decoder_bound, decoder_bound))
            for l in range(L)
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if config.skip else None
        # Normalisation factors (sqrt(d)/E‖x‖ per layer); inputs and targets are multiplied by them.
        self.register_buffer("input_scale", torch.ones(L))
        self.register_buffer("output_scale", torch.ones(L))
        # BatchTopK at inference: a fixed threshold estimated during training (running mean of the
        # smallest kept activation), since a single prompt is no batch.
        self.register_buffer("batchtopk_threshold", torch.zeros(L))

    def n_targets(self, layer: int) -> int:
        return self.config.n_layers - layer if self.config.cross_layer else 1

    @property
    def threshold(self) -> Float[Tensor, "layer feature"]:
        return self.log_threshold.exp()

    # --- encoding -----------------------------------------------------------------------------

    def encode_pre(self, x: Float[Tensor, "batch layer d"]) -> Float[Tensor, "batch layer feature"]:
        self._check_input(x)
        return einsum(x, self.W_enc, "b l d, l d f -> b l f") + self.b_enc

    def activate(self, pre: Float[Tensor, "batch layer feature"]) -> Float[Tensor, "batch layer feature"]:
        activation = self.config.activation
        if activation == "jumprelu":
            return JumpReLU.apply(pre, self.threshold, self.config.bandwidth)
        if activation == "relu":
            return torch.relu(pre)
        if activation == "topk":
            return topk_activation(pre, self.config.k)
        if self.training:
            acts = batch_topk_activation(pre, self.config.k)
            with torch.no_grad():
                smallest = torch.where(acts > 0, acts, torch.inf).amin(dim=(0, 2))
                smallest = torch.where(torch.isfinite(smallest), smallest, self.batchtopk_threshold)
                self.batchtopk_threshold.lerp_(smallest, 0.01)
            return acts
        return pre * (pre > self.batchtopk_threshold[:, None])

    def encode(self, x: Float[Tensor, "batch layer d"]) -> Float[Tensor, "batch layer feature"]:
        return self.activate(self.encode_pre(x))

    # --- decoding -----------------------------------------------------------------------------

    def decode(
        self,
        acts: Float[Tensor, "batch layer feature"],
        x: Float[Tensor, "batch layer d"] | None = None,
        sparse: bool | None = None,
    ) -> Float[Tensor, "batch layer d"]:
        """Reconstruct every layer's MLP output.

        The sparse path multiplies a sparse activation matrix with the decoders, touching only active
        features' rows. Its outputs and decoder gradients equal the dense path's, but it yields no
        gradient at inactive entries, and JumpReLU's straight-through threshold gradient needs exactly
        those (features just below threshold). So `sparse=None` (auto) uses it only for TopK, BatchTopK
        and ReLU, where it is exact, with at least 2,048 features per layer and under 10% of activations
        non-zero: on 2 CPU cores it was 1.13× faster than dense at 2,048 features and 0.96× at 512
        (docs/clt.md). With JumpReLU it is an explicit, approximate choice (`sparse=True`)."""
        if sparse is None:
            sparse = (
                self.config.activation != "jumprelu"
                and self.config.n_features >= 2048
                and bool((acts != 0).float().mean() < 0.1)
            )
        batch = acts.shape[0]
        outputs = [self.b_dec[k].expand(batch, -1) for k in range(self.config.n_layers)]
        for layer in range(self.config.n_layers):
            contribution = (
                self._decode_sparse(acts[:, layer], layer)
                if sparse
                else einsum(acts[:, layer], self.W_dec[layer], "b f, f t d -> b t d")
            )
            for t in range(self.n_targets(layer)):
                outputs[layer + t] = outputs[layer + t] + contribution[:, t]
        reconstruction = torch.stack(outputs, dim=1)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: pass the inputs x to decode()")
            reconstruction = reconstruction + einsum(x, self.W_skip, "b l d, l d e -> b l e")
        return reconstruction

    def _decode_sparse(
        self, layer_acts: Float[Tensor, "batch feature"], layer: int
    ) -> Float[Tensor, "batch target d"]:
        decoder = self.W_dec[layer]
        flat = torch.sparse.mm(layer_acts.to_sparse(), rearrange(decoder, "f t d -> f (t d)"))
        return rearrange(flat, "b (t d) -> b t d", t=decoder.shape[1])

    def forward(
        self, x: Float[Tensor, "batch layer d"], sparse: bool | None = None
    ) -> tuple[
        Float[Tensor, "batch layer d"],
        Float[Tensor, "batch layer feature"],
        Float[Tensor, "batch layer feature"],
    ]:
        pre = self.encode_pre(x)
        acts = self.activate(pre)
        return self.decode(acts, x, sparse), acts, pre

    # --- one layer at a time (the replacement model runs layer by layer) -------------------------

    def encode_layer(self, x: Float[Tensor, "... d"], layer: int) -> Float[Tensor, "... feature"]:
        """Activations of layer `layer`'s features from its (normalised) input."""
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        activation = self.config.activation
        if activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        if activation == "relu":
            return torch.relu(pre)
        if activation == "topk":
            return topk_activation(pre, self.config.k)
        return pre * (pre > self.batchtopk_threshold[layer])

    def decode_layer(
        self,
        acts_by_layer: list[Float[Tensor, "... feature"]],
        target: int,
        x_target: Float[Tensor, "... d"] | None = None,
    ) -> Float[Tensor, "... d"]:
        """(Normalised) reconstruction of layer `target`'s MLP output from the features of layers ≤ target."""
        sources = range(target + 1) if self.config.cross_layer else [target]
        out = self.b_dec[target]
        for source in sources:
            out = out + acts_by_layer[source] @ self.W_dec[source][:, target - source]
        if self.W_skip is not None:
            out = out + x_target @ self.W_skip[target]
        return out

    def decoder_norms(self) -> Float[Tensor, "layer feature"]:
        """‖W_dec,i^l‖ = sqrt(Σ_k ‖W_dec,i^{l→k}‖²) for every feature i of every layer l."""
        return torch.stack([w.pow(2).sum(dim=(1, 2)).sqrt() for w in self.W_dec])

    # --- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def initialize_from_batch(
        self, x: Float[Tensor, "batch layer d"], y: Float[Tensor, "batch layer d"], firing_rate: float = 0.1
    ) -> None:
        """b_dec = mean target; for JumpReLU, b_enc so that each feature fires on ~`firing_rate` of the
        batch."""
        self.b_dec.copy_(y.mean(0))
        if self.config.activation == "jumprelu":
            pre = einsum(x, self.W_enc, "b l d, l d f -> b l f")
            quantile = torch.quantile(pre, 1 - firing_rate, dim=0)
            self.b_enc.copy_(self.threshold - quantile)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.config.n_layers, self.config.d_model)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected activations of shape [batch, {expected[0]}, {expected[1]}], got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("activations contain NaN or inf values")
