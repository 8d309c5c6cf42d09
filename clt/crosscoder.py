"""Crosscoders for model diffing (Lindsey et al. 2024; Minder et al. 2025; docs/methods.md §9).

One dictionary of latents reads the activations of M models (here: before and after fine-tuning) at S
sites (the MLP outputs, or inputs, of chosen layers) on the same tokens, and reconstructs each model's
activations with its own decoder:

    f = act(Σ_{m,s} x^{m,s} W_enc^{m,s} + b_enc)             x^{m,s}: [d], f: [F]
    x̂^{m,s} = f W_dec^{m,s} + b_dec^{m,s}

A latent's **relative decoder norm** r = ‖W_dec^B‖ / (‖W_dec^A‖ + ‖W_dec^B‖) (norms over its sites)
says which model uses it: ≈ 0.5 shared, ≈ 1 only B (after), ≈ 0 only A (before).

The class speaks the transcoder's interface (`forward → (x̂, acts, pre)`, `decoder_norms`, `threshold`,
`initialize_from_batch`, input/output scales), with model × site pairs in the "layer" axis of the
activations and the latents as one "layer", so the CLT's loss (`clt.loss.clt_loss`: reconstruction,
tanh sparsity weighted by decoder norms — the sum over models, as in Lindsey et al. — and the JumpReLU
pre-activation term) and training loop (`clt.train._fit`) train it unchanged. BatchTopK (Minder et al.:
fewer spurious model-specific latents) and JumpReLU / ReLU come from `clt.model`.

`latent_scaling` implements Minder et al.'s check that a "B-only" latent is really absent from A: the
least-squares scale β of the latent's contribution f·d (its B decoder) that best explains A's (and B's)
reconstruction without the latent, and their errors; ν = β_A / β_B near 0 means truly B-specific.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn

from clt.model import CrossLayerTranscoder

CROSSCODER_ACTIVATIONS = ("batchtopk", "topk", "jumprelu", "relu")


@dataclass
class CrosscoderOptions:
    """The crosscoder's dictionary and activation, as a user chooses them."""

    n_features: int = field(default=1024, metadata={"help": "shared latents"})
    activation: str = field(default="batchtopk", metadata={"help": "batchtopk, topk, jumprelu or relu"})
    k: int = field(default=32, metadata={"help": "k for batchtopk / topk (active latents per token)"})
    threshold_init: float = field(default=0.03, metadata={"help": "initial JumpReLU threshold"})
    bandwidth: float = field(default=1.0, metadata={"help": "JumpReLU straight-through width ε"})


@dataclass
class CrosscoderConfig(CrosscoderOptions):
    n_models: int = 2
    n_sites: int = 1
    d_model: int = 0

    def __post_init__(self):
        if self.activation not in CROSSCODER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CROSSCODER_ACTIVATIONS}, got {self.activation!r}")
        if min(self.n_models, self.n_sites, self.d_model, self.n_features) < 1:
            raise ValueError(f"n_models, n_sites, d_model and n_features must be positive: {self}")

    @property
    def n_inputs(self) -> int:
        """Model × site pairs: the crosscoder's "layer" axis, model-major (A's sites, then B's)."""
        return self.n_models * self.n_sites

    def to_dict(self) -> dict:
        return asdict(self)


class Crosscoder(nn.Module):
    def __init__(self, config: CrosscoderConfig):
        super().__init__()
        self.config = config
        n, d, F = config.n_inputs, config.d_model, config.n_features
        self.W_enc = nn.Parameter(torch.empty(n, d, F).uniform_(-(F**-0.5), F**-0.5))
        self.b_enc = nn.Parameter(torch.zeros(1, F))
        self.log_threshold = nn.Parameter(
            torch.full((1, F), float(torch.log(torch.tensor(config.threshold_init))))
        )
        # Lindsey et al.: decoders start as the encoder's transpose, scaled small.
        self.W_dec = nn.Parameter(rearrange(self.W_enc.detach().clone(), "n d f -> f n d") * 0.1)
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("output_scale", torch.ones(n))
        self.register_buffer("batchtopk_threshold", torch.zeros(1))

    @property
    def threshold(self) -> Float[Tensor, "1 feature"]:
        return self.log_threshold.exp()

    def encode_pre(self, x: Float[Tensor, "batch input d"]) -> Float[Tensor, "batch 1 feature"]:
        self._check_input(x)
        return (einsum(x, self.W_enc, "b n d, n d f -> b f") + self.b_enc[0])[:, None]

    # The latents are the transcoder's activation with one "layer": the same code, thresholds included.
    activate = CrossLayerTranscoder.activate

    def decode(self, acts: Float[Tensor, "batch 1 feature"]) -> Float[Tensor, "batch input d"]:
        return einsum(acts[:, 0], self.W_dec, "b f, f n d -> b n d") + self.b_dec

    def forward(
        self, x: Float[Tensor, "batch input d"], sparse: bool | None = None
    ) -> tuple[
        Float[Tensor, "batch input d"], Float[Tensor, "batch 1 feature"], Float[Tensor, "batch 1 feature"]
    ]:
        pre = self.encode_pre(x)
        acts = self.activate(pre)
        return self.decode(acts), acts, pre

    def model_decoder_norms(self) -> Float[Tensor, "model feature"]:
        """‖W_dec^m[i]‖ over each model's sites."""
        per_model = rearrange(self.W_dec, "f (m s) d -> m f (s d)", m=self.config.n_models)
        return per_model.norm(dim=-1)

    def decoder_norms(self) -> Float[Tensor, "1 feature"]:
        """The sparsity weight Σ_m ‖W_dec^m[i]‖ (Lindsey et al.), shaped as one "layer" of latents."""
        return self.model_decoder_norms().sum(0)[None]

    def relative_norms(self, a: int = 0, b: int = 1) -> Float[Tensor, " feature"]:
        norms = self.model_decoder_norms()
        return norms[b] / (norms[a] + norms[b]).clamp(min=1e-12)

    @torch.no_grad()
    def initialize_from_batch(
        self, x: Float[Tensor, "batch input d"], y: Float[Tensor, "batch input d"], firing_rate: float = 0.1
    ) -> None:
        self.b_dec.copy_(y.mean(0))
        if self.config.activation == "jumprelu":
            pre = einsum(x, self.W_enc, "b n d, n d f -> b f")
            self.b_enc.copy_(self.threshold - torch.quantile(pre, 1 - firing_rate, dim=0)[None])

    def _check_input(self, x: Tensor) -> None:
        expected = (self.config.n_inputs, self.config.d_model)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected paired activations of shape [batch, {expected[0]}, {expected[1]}] "
                f"(models × sites, d_model), got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("activations contain NaN or inf values")


def classify_latents(
    relative: Float[Tensor, " feature"], ever_active: Tensor, low: float = 0.1, high: float = 0.9
) -> dict[str, int]:
    """Counts of A-only (r < low), B-only (r > high), shared (0.3 ≤ r ≤ 0.7), other, and dead latents."""
    alive = ever_active.bool()
    return {
        "a_only": int(((relative < low) & alive).sum()),
        "b_only": int(((relative > high) & alive).sum()),
        "shared": int(((relative >= 0.3) & (relative <= 0.7) & alive).sum()),
        "in_between": int(
            (~((relative < low) | (relative > high) | ((relative >= 0.3) & (relative <= 0.7))) & alive).sum()
        ),
        "dead": int((~alive).sum()),
    }


@torch.no_grad()
def latent_scaling(
    crosscoder: Crosscoder, x: Float[Tensor, "batch input d"], latents: list[int], a: int = 0, b: int = 1
) -> dict[int, dict[str, float]]:
    """Minder et al.'s latent scaling for B-only candidates, on a batch of (scaled) paired activations.

    With c = f_j · W_dec^B[j] (latent j's contribution as B writes it), least-squares scales
    β = Σ⟨c, t⟩ / Σ‖c‖² for the targets: B's activation (β_B: how much of B the latent explains),
    A's reconstruction without latent j (β_A,reconstruction: is the direction in A, carried by other
    latents?) and A's reconstruction error (β_A,error: is it in A, missed by the dictionary?).
    ν = β_A / β_B: near 0, the latent is truly B-specific; near 1, A has it just as much."""
    S = crosscoder.config.n_sites
    x_hat, acts, _ = crosscoder(x)
    site_a, site_b = slice(a * S, (a + 1) * S), slice(b * S, (b + 1) * S)
    out = {}
    for j in latents:
        f = acts[:, 0, j]  # [batch]
        contribution = f[:, None, None] * crosscoder.W_dec[j, site_b][None]  # [batch, S, d]
        denominator = contribution.pow(2).sum().clamp(min=1e-12)

        def beta(target: Tensor) -> float:
            return float((contribution * target).sum() / denominator)

        own_a = f[:, None, None] * crosscoder.W_dec[j, site_a][None]
        result = {
            "beta_b": beta(x[:, site_b]),
            "beta_a_reconstruction": beta(x_hat[:, site_a] - own_a),
            "beta_a_error": beta(x[:, site_a] - x_hat[:, site_a]),
            "active_tokens": int((f > 0).sum()),
        }
        for kind in ("reconstruction", "error"):
            b_value = result["beta_b"]
            result[f"nu_{kind}"] = (
                result[f"beta_a_{kind}"] / b_value if abs(b_value) > 1e-12 else float("nan")
            )
        out[j] = result
    return out
