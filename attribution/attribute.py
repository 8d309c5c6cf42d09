"""Attribution graphs of the local replacement model (docs/methods.md §3).

For one prompt: freeze attention patterns and LayerNorm scales (`FrozenGPT2`), replace each MLP output
by its CLT reconstruction plus a constant error node, and compute every direct effect

    A[t, s] = (source vector s) · ∂(target read-out t)/∂(residual where s writes)

where a source is a token embedding, an active feature (decoder vector × activation, summed over the
layers it writes to) or an error node, and a target is an active feature (its encoder vector read at
its layer's MLP input) or a logit / custom direction (read at the final residual of the last position).

How it is computed, and why it is fast on a CPU: targets are sorted by (layer, position) and taken in
batches; each batch runs *one* explicit transpose of the frozen model (`FrozenGPT2.backward`), starting
at the batch's highest layer and truncated to its last position (nothing later can affect it). Its
gradients at every MLP output and at the embeddings are then contracted with all sources at once: the
sources of each (layer, position) site are packed into a padded block, so the contraction is one
batched matrix product per layer. No autograd graph, no batch of prompt copies.
Position 0 (BOS) has no feature or error nodes — its MLP outputs are constants, as in circuit-tracer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from attribution.frozen import FrozenGPT2
from attribution.graph import AttributionGraph
from attribution.targets import Target, salient_logit_targets
from clt.export import folded_weights
from clt.model import CrossLayerTranscoder


@dataclass
class ReplacementState:
    """The CLT side of the local replacement model on one prompt (raw activation scale)."""

    activations: Float[Tensor, "layer pos feature"]  # zero at position 0
    reconstruction: Float[Tensor, "layer pos d"]  # Σ features' decoder vectors + b_dec
    errors: Float[Tensor, "layer pos d"]  # mlp_out − reconstruction, zero at position 0
    W_enc: Float[Tensor, "layer d feature"]
    W_dec: list[Float[Tensor, "feature target d"]]
    b_enc: Float[Tensor, "layer feature"]


@torch.no_grad()
def replacement_state(
    frozen: FrozenGPT2, clt: CrossLayerTranscoder, zero_positions: int = 1
) -> ReplacementState:
    if (clt.config.n_layers, clt.config.d_model) != (frozen.n_layers, frozen.W_U.shape[0]):
        raise ValueError(
            f"transcoder is for {clt.config.n_layers} layers × {clt.config.d_model}, the model has "
            f"{frozen.n_layers} × {frozen.W_U.shape[0]}"
        )
    if clt.W_skip is not None:
        raise ValueError(
            "attribution through a transcoder's skip connection is not implemented; "
            "use a transcoder trained without --skip"
        )
    dtype, device = frozen.W_U.dtype, frozen.W_U.device
    clt = copy.deepcopy(clt).to(device=device, dtype=dtype).eval()
    acts = []
    for layer in range(frozen.n_layers):
        a = clt.encode_layer(frozen.mlp_in[layer] * clt.input_scale[layer], layer)
        a[:zero_positions] = 0
        acts.append(a)
    reconstruction = torch.stack(
        [clt.decode_layer(acts, layer) / clt.output_scale[layer] for layer in range(frozen.n_layers)]
    )
    errors = frozen.mlp_out - reconstruction
    errors[:, :zero_positions] = 0
    folded = folded_weights(clt)
    return ReplacementState(
        activations=torch.stack(acts),
        reconstruction=reconstruction,
        errors=errors,
        W_enc=folded["W_enc"].to(device, dtype),
        b_enc=folded["b_enc"].to(device, dtype),
        W_dec=[w.to(device, dtype) for w in folded["W_dec"]],
    )


class SourceBlock:
    """All source vectors that write into one site (an MLP output layer, or the embeddings), packed per
    position into a padded [pos, slots, d] block so that contracting them with a batch of gradients
    [batch, pos, d] is one batched matmul."""

    def __init__(
        self,
        vectors: Float[Tensor, "n d"],
        positions: Int[Tensor, " n"],
        columns: Int[Tensor, " n"],
        n_pos: int,
    ):
        order = torch.argsort(positions, stable=True)
        vectors, positions, columns = vectors[order], positions[order], columns[order]
        counts = torch.bincount(positions, minlength=n_pos)
        slot = torch.arange(len(positions), device=positions.device) - (counts.cumsum(0) - counts)[positions]
        width = int(counts.max()) if len(positions) else 0
        self.vectors = vectors.new_zeros(n_pos, width, vectors.shape[1])
        self.vectors[positions, slot] = vectors
        self.columns = torch.full((n_pos, width), -1, dtype=torch.long, device=positions.device)
        self.columns[positions, slot] = columns

    def contract(self, grad: Float[Tensor, "batch pos d"], out: Float[Tensor, "batch nodes"]) -> None:
        """out[:, column] += grad[:, pos] · vector for every source
        (only the first grad.shape[1] positions)."""
        n_pos = grad.shape[1]
        if self.vectors.shape[1] == 0:
            return
        scores = torch.bmm(
            rearrange(grad, "b p d -> p b d"), rearrange(self.vectors[:n_pos], "p s d -> p d s")
        )
        columns = self.columns[:n_pos]
        valid = columns >= 0
        out[:, columns[valid]] += rearrange(scores, "p b s -> b p s")[:, valid]


def attribute(
    model,
    clt: CrossLayerTranscoder,
    tokens: Int[Tensor, " pos"],
    targets: list[Target] | None = None,
    tokenizer=None,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    metadata: dict | None = None,
    targets_only: bool = False,
) -> AttributionGraph:
    """The full (unpruned) attribution graph of `tokens` (which should start with BOS).

    targets: read-out directions at the last position; None = salient logits (cumulative probability
    `desired_logit_prob`, at most `max_n_logits`). targets_only: compute only the targets' rows (every
    node's direct effect on the read-outs) and leave the feature rows zero — one backward pass instead
    of one per batch of active features, for rankings that need only direct effects."""
    timings = {}
    start = time.perf_counter()
    frozen = FrozenGPT2.capture(model, tokens, dtype=dtype)
    state = replacement_state(frozen, clt)
    timings["forward_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if targets is None:
        targets = salient_logit_targets(
            frozen.logits[-1], frozen.W_U, tokenizer, max_n_logits, desired_logit_prob
        )
    if not targets:
        raise ValueError("no attribution targets")
    L, n = frozen.n_layers, frozen.n_pos
    active = state.activations.nonzero()  # (layer, pos, feature), lexicographic like circuit-tracer
    values = state.activations[active[:, 0], active[:, 1], active[:, 2]]
    n_feat = len(active)
    error_start, token_start = n_feat, n_feat + L * n
    n_sources = token_start + n
    blocks = _source_blocks(frozen, state, active, values, error_start, token_start)
    timings["setup_s"] = time.perf_counter() - start

    start = time.perf_counter()
    # Rows are written straight into the adjacency (features first, targets last; sources are columns).
    adjacency = torch.zeros(
        n_sources + len(targets), n_sources + len(targets), dtype=dtype, device=frozen.W_U.device
    )
    feature_rows, target_rows = adjacency[:n_feat, :n_sources], adjacency[n_sources:, :n_sources]
    target_vectors = torch.stack([t.vector.to(frozen.W_U) for t in targets])
    # Logit rows first: one batch (there are at most a handful).
    _attribute_batch(
        frozen,
        blocks,
        target_rows,
        [(L, torch.arange(len(targets)), torch.full((len(targets),), n - 1), target_vectors)],
        n_pos=n,
        top_layer=L,
        timings=timings,
    )
    feature_encoders = state.W_enc[active[:, 0], :, active[:, 2]]  # [n_feat, d]
    for begin in tqdm(
        range(0, 0 if targets_only else n_feat, batch_size),
        desc="attribution",
        disable=not progress,
        unit="batch",
    ):
        batch = slice(begin, min(begin + batch_size, n_feat))
        layers, positions = active[batch, 0], active[batch, 1]
        reads = []
        for layer in layers.unique().tolist():
            mask = layers == layer
            reads.append((layer, mask.nonzero()[:, 0], positions[mask], feature_encoders[batch][mask]))
        _attribute_batch(
            frozen,
            blocks,
            feature_rows[batch],
            reads,
            n_pos=int(positions.max()) + 1,
            top_layer=int(layers.max()),
            timings=timings,
        )
    timings["edges_s"] = time.perf_counter() - start

    token_strings = (
        [tokenizer.decode([t]) for t in tokens.tolist()]
        if tokenizer is not None
        else [str(t) for t in tokens.tolist()]
    )
    return AttributionGraph(
        tokens=tokens.cpu(),
        token_strings=token_strings,
        active_features=active.cpu(),
        activations=values.cpu(),
        adjacency=adjacency.cpu(),
        target_labels=[t.label for t in targets],
        target_vocab_ids=[t.vocab_idx for t in targets],
        target_weights=torch.tensor([t.weight for t in targets], dtype=dtype),
        n_layers=L,
        metadata={
            **(metadata or {}),
            "timings": timings,
            "vocab_size": frozen.W_U.shape[1],
            "dtype": str(dtype).removeprefix("torch."),
            "n_active_features": n_feat,
            "targets_only": targets_only,
        },
    )


def _source_blocks(
    frozen: FrozenGPT2,
    state: ReplacementState,
    active: Int[Tensor, "n 3"],
    values: Float[Tensor, " n"],
    error_start: int,
    token_start: int,
) -> list[SourceBlock]:
    """One block per MLP-output layer k (features of layers ≤ k decoding into k, and k's error nodes)
    and, last, the embeddings (token nodes)."""
    L, n = frozen.n_layers, frozen.n_pos
    device = values.device
    positions_all = torch.arange(n, device=device)
    blocks = []
    for k in range(L):
        vectors, positions, columns = [], [], []
        for source_layer in range(k + 1):
            mask = active[:, 0] == source_layer
            index = mask.nonzero()[:, 0]
            if len(index) == 0:
                continue
            decoders = state.W_dec[source_layer][active[index, 2], k - source_layer] * values[index, None]
            vectors.append(decoders)
            positions.append(active[index, 1])
            columns.append(index)
        vectors.append(state.errors[k])
        positions.append(positions_all)
        columns.append(error_start + k * n + positions_all)
        blocks.append(SourceBlock(torch.cat(vectors), torch.cat(positions), torch.cat(columns), n))
    blocks.append(SourceBlock(frozen.token_embeddings, positions_all, token_start + positions_all, n))
    return blocks


def _attribute_batch(
    frozen: FrozenGPT2,
    blocks: list[SourceBlock],
    out: Float[Tensor, "batch sources"],
    reads: list,
    n_pos: int,
    top_layer: int,
    timings: dict,
) -> None:
    start = time.perf_counter()
    grad_mlp_out, grad_embed = frozen.backward(reads, batch=out.shape[0], n_pos=n_pos, top_layer=top_layer)
    middle = time.perf_counter()
    for k in range(
        min(top_layer, frozen.n_layers)
    ):  # MLP outputs at or above the top read layer get no gradient
        blocks[k].contract(grad_mlp_out[k], out)
    blocks[-1].contract(grad_embed, out)
    timings["backward_s"] = timings.get("backward_s", 0.0) + middle - start
    timings["contract_s"] = timings.get("contract_s", 0.0) + time.perf_counter() - middle
