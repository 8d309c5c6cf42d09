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
sources of each site are packed into padded blocks (positions grouped by how many sources they hold), so
the contraction is a few batched matrix products per layer. No autograd graph, no batch of prompt copies.
Position 0 (BOS) has no feature or error nodes — its MLP outputs are constants, as in circuit-tracer.
"""

from __future__ import annotations

import bisect
import copy
import time
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor
from tqdm import tqdm

from attribution.frozen import FrozenGPT2
from attribution.graph import AttributionGraph
from attribution.memory import AttributionSize, MemoryBudgetError, current_rss_bytes
from attribution.prune import influence, row_blocks
from attribution.targets import Target, salient_logit_targets
from clt.model import CrossLayerTranscoder


@dataclass
class ReplacementState:
    """The CLT side of the local replacement model on one prompt (raw activation scale).

    The CLT's weights are held as they are (no copy); the normalisation scales are folded in only for
    the vectors attribution reads (`encoder_vectors`, `decoder_vectors`) — folding whole matrices per
    prompt was two copies of the CLT, most of a short prompt's time on a large transcoder."""

    activations: Float[Tensor, "layer pos feature"]  # zero at position 0
    reconstruction: Float[Tensor, "layer pos d"]  # Σ features' decoder vectors + b_dec
    errors: Float[Tensor, "layer pos d"]  # mlp_out − reconstruction, zero at position 0
    b_enc: Float[Tensor, "layer feature"]
    raw_W_enc: Float[Tensor, "layer d feature"]  # acts on normalised inputs: × input_scale folds it
    raw_W_dec: list[Float[Tensor, "feature target d"]]  # writes normalised outputs: ÷ output_scale
    input_scale: Float[Tensor, " layer"]
    output_scale: Float[Tensor, " layer"]

    def encoder_vectors(self, layers: Int[Tensor, " n"], features: Int[Tensor, " n"]) -> Float[Tensor, "n d"]:
        """What each feature reads from its layer's (raw) MLP input."""
        return self.raw_W_enc[layers, :, features] * self.input_scale[layers, None]

    def decoder_vectors(self, source: int, features: Int[Tensor, " n"], target: int) -> Float[Tensor, "n d"]:
        """What features of layer `source` write to layer `target`'s (raw) MLP output."""
        return self.raw_W_dec[source][features, target - source] / self.output_scale[target]

    @property
    def W_enc(self) -> Float[Tensor, "layer d feature"]:
        """Every encoder, folded (a copy: for tests and small analyses)."""
        return self.raw_W_enc * self.input_scale[:, None, None]

    @property
    def W_dec(self) -> list[Float[Tensor, "feature target d"]]:
        """Every decoder, folded (a copy)."""
        return [
            w / self.output_scale[layer : layer + w.shape[1]][None, :, None]
            for layer, w in enumerate(self.raw_W_dec)
        ]


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
    if (clt.W_enc.dtype, clt.W_enc.device) != (dtype, device):
        clt = copy.deepcopy(clt).to(device=device, dtype=dtype)  # (the caller's transcoder is left as is)
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
    return ReplacementState(
        activations=torch.stack(acts),
        reconstruction=reconstruction,
        errors=errors,
        b_enc=clt.b_enc.detach(),
        raw_W_enc=clt.W_enc.detach(),
        raw_W_dec=[w.detach() for w in clt.W_dec],
        input_scale=clt.input_scale.detach(),
        output_scale=clt.output_scale.detach(),
    )


class SourceBlock:
    """All source vectors that write into one site (an MLP output layer, or the embeddings), packed so
    that contracting them with a batch of gradients [batch, pos, d] is a few batched matmuls.

    Positions are grouped by how many sources they hold, and each group is padded only to its own widest
    position ([group positions, slots, d]). One padded block for all positions made every position as wide
    as the widest: on the base model's 256- and 512-token prompts the blocks were 2.6–7.8× their sources,
    850 MB of a 512-token run (and the bmm spent the same factor on zeros)."""

    def __init__(
        self,
        vectors: Float[Tensor, "n d"],
        positions: Int[Tensor, " n"],
        columns: Int[Tensor, " n"],
        n_pos: int,
    ):
        # (only the order is sorted: each group gathers its sources from the unsorted vectors, one copy)
        order = torch.argsort(positions, stable=True)
        counts = torch.bincount(positions, minlength=n_pos)
        first = counts.cumsum(0) - counts  # each position's first source in `order`
        slot_budget = max(1, GROUP_SLACK_BYTES // (vectors.shape[1] * vectors.element_size()))
        self.groups = [
            _PaddedGroup(vectors, columns, order, counts, first, group)
            for group in position_groups(counts, slot_budget)
        ]

    @property
    def padded_slots(self) -> list[int]:
        """Slots (sources and padding) of each group."""
        return [group.columns.numel() for group in self.groups]

    def contract(self, grad: Float[Tensor, "batch pos d"], out_t: Float[Tensor, "nodes batch"]) -> None:
        """out_t[column] += grad[:, pos] · vector for every source (only the first grad.shape[1]
        positions). The output is source-major: each group's scores come out of its matmul as
        [positions · slots, batch] rows and are added to their columns' rows in one index_add."""
        grad_t = rearrange(grad, "b p d -> p d b")  # (a view: to the matmul, a transposed operand)
        for group in self.groups:
            group.contract(grad_t, out_t)


# Padding a group may carry beyond a quarter of its sources: a prompt of a few dozen tokens stays one
# group (one matmul per site per batch, what short prompts' speed needs), long ones split by width.
GROUP_SLACK_BYTES = 2 * 2**20


def position_groups(counts: Int[Tensor, " pos"], slot_budget: int) -> list[Int[Tensor, " positions"]]:
    """Positions (with at least one source) in groups of similar counts, each in ascending order: taken
    widest first, a group grows while its padding stays within a quarter of its sources or within
    `slot_budget` slots."""
    by_count = torch.argsort(counts, descending=True, stable=True).tolist()
    ordered = counts[by_count].tolist()
    groups, begin = [], 0
    while begin < len(ordered) and ordered[begin] > 0:
        width, sources, end = ordered[begin], 0, begin
        while end < len(ordered) and ordered[end] > 0:
            padding = width * (end - begin + 1) - (sources + ordered[end])
            if padding > max((sources + ordered[end]) // 4, slot_budget):
                break
            sources += ordered[end]
            end += 1
        groups.append(torch.tensor(sorted(by_count[begin:end]), dtype=torch.long, device=counts.device))
        begin = end
    return groups


class _PaddedGroup:
    """One group of positions' sources as a padded [positions, slots, d] block (columns −1 in padding)."""

    def __init__(
        self,
        vectors: Float[Tensor, "n d"],
        columns: Int[Tensor, " n"],
        order: Int[Tensor, " n"],
        counts: Int[Tensor, " pos"],
        first: Int[Tensor, " pos"],
        positions: Int[Tensor, " group"],
    ):
        group_counts = counts[positions]
        width = int(group_counts.max())
        slot = torch.arange(width, device=positions.device)
        filled = slot[None, :] < group_counts[:, None]  # [group, slots]
        source = order[(first[positions, None] + slot[None, :])[filled]]
        self.positions = positions
        self.position_list = positions.tolist()  # (for truncation without a device sync)
        self.contiguous = self.position_list == list(range(len(positions)))
        self.vectors = vectors.new_zeros(len(positions), width, vectors.shape[1])
        self.vectors[filled] = vectors[source]
        self.columns = torch.full((len(positions), width), -1, dtype=torch.long, device=positions.device)
        self.columns[filled] = columns[source]
        # Where each slot's score is added: padding slots (zero vectors, so exactly zero scores) are
        # pointed at a real column of the group, which adding 0 leaves as it is — no mask to apply.
        self.slot_columns = rearrange(self.columns.where(filled, self.columns[0, 0]), "p s -> (p s)")

    def contract(self, grad_t: Float[Tensor, "pos d batch"], out_t: Float[Tensor, "nodes batch"]) -> None:
        keep = bisect.bisect_left(self.position_list, grad_t.shape[0])  # positions the gradient reaches
        if keep == 0:
            return
        rows = grad_t[:keep] if self.contiguous else grad_t[self.positions[:keep]]
        scores = torch.bmm(self.vectors[:keep], rows)  # [positions, slots, batch]
        out_t.index_add_(0, self.slot_columns[: scores.shape[0] * scores.shape[1]], scores.flatten(0, 1))


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
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    max_memory: int | None = None,
    report=None,
) -> AttributionGraph:
    """The full (unpruned) attribution graph of `tokens` (which should start with BOS).

    targets: read-out directions at the last position; None = salient logits (cumulative probability
    `desired_logit_prob`, at most `max_n_logits`). targets_only: compute only the targets' rows (every
    node's direct effect on the read-outs) and leave the feature rows zero — one backward pass instead
    of one per batch of active features, for rankings that need only direct effects.

    max_feature_nodes: a feature budget, as circuit-tracer's: only the most influential features get
    rows (influence on the targets through the rows computed so far, re-ranked every `update_interval`
    batches) and the graph holds only them — what bounds the memory of long prompts. max_memory: bytes
    the run may use; the estimate (attribution.memory) is reported through `report` once the forward
    pass has counted the active features, and a run that would not fit is refused before any edge."""
    timings = {}
    start = time.perf_counter()
    frozen = FrozenGPT2.capture(model, tokens, dtype=dtype)
    state = replacement_state(frozen, clt)
    timings["forward_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if targets is None:
        targets = salient_logit_targets(
            frozen.last_logits, frozen.W_U, tokenizer, max_n_logits, desired_logit_prob
        )
    if not targets:
        raise ValueError("no attribution targets")
    L, n = frozen.n_layers, frozen.n_pos
    active = state.activations.nonzero()  # (layer, pos, feature), lexicographic like circuit-tracer
    values = state.activations[active[:, 0], active[:, 1], active[:, 2]]
    n_active, n_targets = len(active), len(targets)
    budget = n_active if max_feature_nodes is None else max(0, min(max_feature_nodes, n_active))
    if targets_only:
        budget = 0
    error_start, token_start = n_active, n_active + L * n
    n_sources = token_start + n
    blocks = _source_blocks(frozen, state, active, values, error_start, token_start)
    size = AttributionSize.of(frozen, blocks, n_active, n_targets, budget, batch_size, dtype)
    now = current_rss_bytes(frozen.W_U.device)
    estimate = size.peak_bytes(now)
    if report is not None:
        report(size.describe(estimate))
    if max_memory is not None and estimate > max_memory:
        raise MemoryBudgetError(size.refusal(estimate, max_memory, now))
    timings["setup_s"] = time.perf_counter() - start

    start = time.perf_counter()
    feature_encoders = state.encoder_vectors(active[:, 0], active[:, 2])  # [n_active, d]
    target_vectors = torch.stack([t.vector.to(frozen.W_U) for t in targets])
    target_reads = [(L, torch.arange(n_targets), torch.full((n_targets,), n - 1), target_vectors)]
    device = frozen.W_U.device
    if budget == n_active or targets_only:
        # Every feature gets its row, written straight into the adjacency (features first, targets last;
        # sources are columns), in (layer, position) order so each batch's backward is truncated.
        adjacency = torch.zeros(n_sources + n_targets, n_sources + n_targets, dtype=dtype, device=device)
        _attribute_batch(frozen, blocks, adjacency[n_sources:, :n_sources], target_reads, n, L, timings)
        starts = range(0, budget, batch_size)
        for begin in tqdm(starts, desc="attribution", disable=not progress, unit="batch"):
            batch = slice(begin, min(begin + batch_size, budget))
            rows = adjacency[batch, :n_sources]
            _feature_rows(frozen, blocks, rows, active[batch], feature_encoders[batch], timings)
    else:
        context = _Sources(frozen, blocks, active, feature_encoders, n_sources, timings)
        weights = torch.tensor([t.weight for t in targets], dtype=dtype, device=device)
        adjacency, selected = _budgeted_rows(
            context, target_reads, weights, budget, batch_size, update_interval, progress
        )
        active, values = active[selected], values[selected]
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
            "n_active_features": n_active,
            "feature_nodes": len(active),
            "memory_estimate_bytes": estimate,
            "targets_only": targets_only,
        },
    )


def _feature_rows(
    frozen: FrozenGPT2,
    blocks: list[SourceBlock],
    out: Float[Tensor, "batch sources"],
    active: Int[Tensor, "batch 3"],
    encoders: Float[Tensor, "batch d"],
    timings: dict,
) -> None:
    """The rows of a batch of features, read by their encoders at their layer's MLP input."""
    layers, positions = active[:, 0], active[:, 1]
    reads = []
    for layer in layers.unique().tolist():
        mask = layers == layer
        reads.append((layer, mask.nonzero()[:, 0], positions[mask], encoders[mask]))
    _attribute_batch(frozen, blocks, out, reads, int(positions.max()) + 1, int(layers.max()), timings)


@dataclass
class _Sources:
    """What every batch of feature rows needs: the frozen model, the packed sources, the active features."""

    frozen: FrozenGPT2
    blocks: list[SourceBlock]
    active: Int[Tensor, "n_active 3"]
    encoders: Float[Tensor, "n_active d"]
    n_sources: int
    timings: dict


def _budgeted_rows(
    sources: _Sources,
    target_reads: list,
    target_weights: Float[Tensor, " n_targets"],
    budget: int,
    batch_size: int,
    update_interval: int,
    progress: bool,
) -> tuple[Float[Tensor, "nodes nodes"], Int[Tensor, " budget"]]:
    """Rows for the `budget` most influential features (circuit-tracer's procedure): the target rows
    first, then, until the budget is spent, rank the features not yet expanded by their influence
    through the rows known so far and expand the next `update_interval` batches of them. Returns the
    adjacency over (selected features, errors, tokens, targets) and the selected features' indices."""
    n_active, n_targets, n_sources = len(sources.active), len(target_weights), sources.n_sources
    n_columns = n_sources + n_targets  # node space: every active feature, errors, tokens, targets
    frozen, device, dtype = sources.frozen, sources.encoders.device, sources.encoders.dtype
    # The rows hold |A| while features are ranked (influence needs only |A|, and taking it once per row
    # instead of once per product and ranking is most of the selection's time); `negative` keeps the signs,
    # a bit per edge (a byte per edge was 0.9 GB of a 1,024-token prompt's 7 GB), and they are put back
    # when the adjacency is packed.
    rows = torch.zeros(n_targets + budget, n_columns, dtype=dtype, device=device)
    negative = torch.zeros(n_targets + budget, packed_width(n_columns), dtype=torch.uint8, device=device)
    row_nodes = torch.zeros(n_targets + budget, dtype=torch.long, device=device)

    def keep_absolute(filled_rows: slice) -> None:
        negative[filled_rows] = pack_bits(torch.signbit(rows[filled_rows]))
        rows[filled_rows].abs_()

    targets_out = rows[:n_targets, :n_sources]
    _attribute_batch(
        frozen, sources.blocks, targets_out, target_reads, frozen.n_pos, frozen.n_layers, sources.timings
    )
    keep_absolute(slice(0, n_targets))
    row_nodes[:n_targets] = n_sources + torch.arange(n_targets, device=device)
    weights = torch.zeros(n_columns, dtype=dtype, device=device)
    weights[n_sources:] = target_weights
    visited = torch.zeros(n_active, dtype=torch.bool, device=device)
    filled = n_targets
    with tqdm(total=budget, desc="attribution", disable=not progress, unit="feature") as bar:
        while filled - n_targets < budget:
            scores = influence(rows[:filled], weights, row_nodes[:filled], absolute=True)[:n_active]
            ranked = torch.argsort(scores, descending=True, stable=True)
            queue = ranked[~visited[ranked]][
                : min(update_interval * batch_size, budget - (filled - n_targets))
            ]
            # (layer, position) order within the queue: each batch's backward stops at its top layer.
            for batch in queue.sort().values.split(batch_size):
                out = rows[filled : filled + len(batch), :n_sources]
                _feature_rows(
                    frozen,
                    sources.blocks,
                    out,
                    sources.active[batch],
                    sources.encoders[batch],
                    sources.timings,
                )
                keep_absolute(slice(filled, filled + len(batch)))
                row_nodes[filled : filled + len(batch)] = batch
                visited[batch] = True
                filled += len(batch)
                bar.update(len(batch))
    selected = visited.nonzero()[:, 0]
    # Columns of the selected features, then errors, tokens and targets; rows placed in node order.
    columns = torch.cat([selected, torch.arange(n_active, n_columns, device=device)])
    new_index = torch.full((n_columns,), -1, dtype=torch.long, device=device)
    new_index[columns] = torch.arange(len(columns), device=device)
    adjacency = torch.zeros(len(columns), len(columns), dtype=dtype, device=device)
    # Small blocks: the rows and the adjacency are both alive here, and a block's gathered copy, its
    # unpacked signs and their temporaries (≈ 2× the block) come on top — at 64 MB they were a third
    # of a 64-token prompt's memory.
    for block in row_blocks(*rows.shape, block_bytes=PACK_BLOCK_BYTES):
        signed = rows[block][:, columns]  # (a copy: the columns are gathered)
        signed[unpack_bits(negative[block], n_columns)[:, columns]] *= -1
        adjacency[new_index[row_nodes[block]]] = signed
    return adjacency, selected


PACK_BLOCK_BYTES = 4 * 2**20


def packed_width(n_bits: int) -> int:
    """Bytes a row of `n_bits` booleans takes packed eight to a byte."""
    return -(-n_bits // 8)


def pack_bits(bits: Bool[Tensor, "rows n"]) -> UInt8[Tensor, "rows bytes"]:
    """Eight booleans a byte, the first in the lowest bit (a row's tail padded with False)."""
    n_rows, n_bits = bits.shape
    padded = bits.new_zeros(n_rows, packed_width(n_bits) * 8)
    padded[:, :n_bits] = bits
    eights = rearrange(padded, "r (byte bit) -> bit r byte", bit=8).to(torch.uint8)
    packed = eights[0].clone()
    for bit in range(1, 8):
        packed |= eights[bit] << bit
    return packed


def unpack_bits(packed: UInt8[Tensor, "rows bytes"], n_bits: int) -> Bool[Tensor, "rows n"]:
    """pack_bits undone: the first `n_bits` booleans of each row."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, :, None] >> shifts) & 1
    return rearrange(bits, "r byte bit -> r (byte bit)")[:, :n_bits].bool()


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
            decoders = state.decoder_vectors(source_layer, active[index, 2], k) * values[index, None]
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
    """out[:, source] = the direct effect of every source on each read in `reads` (one transpose pass)."""
    start = time.perf_counter()
    grad_mlp_out, grad_embed = frozen.backward(reads, batch=out.shape[0], n_pos=n_pos, top_layer=top_layer)
    middle = time.perf_counter()
    out_t = out.new_zeros(out.shape[1], out.shape[0])  # source-major, as the blocks add into it
    for k in range(
        min(top_layer, frozen.n_layers)
    ):  # MLP outputs at or above the top read layer get no gradient
        blocks[k].contract(grad_mlp_out[k], out_t)
    blocks[-1].contract(grad_embed, out_t)
    out += out_t.T
    timings["backward_s"] = timings.get("backward_s", 0.0) + middle - start
    timings["contract_s"] = timings.get("contract_s", 0.0) + time.perf_counter() - middle
