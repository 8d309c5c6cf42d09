"""Influence, pruning and graph scores (docs/methods.md §3, after Ameisen et al. 2025).

Â = |A| with rows normalised to sum 1 (each target's inputs as shares). A node's influence on the
targets is Σ_{k≥1} w Âᵏ — every path, weighted by the targets' weights w (logit probabilities) — which
terminates because the graph is acyclic (Âᵏ = 0 beyond the longest path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attribution.graph import AttributionGraph

# Rows per block when a pass streams over the adjacency: ≈ 64 MB of float32 temporaries at a time, so the
# passes below never hold a second copy of the (n × n) matrix — what runs long prompts out of memory.
BLOCK_BYTES = 64 * 2**20


def row_blocks(n_rows: int, n_columns: int, block_bytes: int = BLOCK_BYTES) -> list[slice]:
    step = max(1, block_bytes // (4 * max(n_columns, 1)))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def normalized_abs(adjacency: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Â: |A| with each row scaled to sum 1 (a copy; the streaming passes below avoid it)."""
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def abs_row_sums(
    rows: Float[Tensor, "r n"], column_mask: Bool[Tensor, " n"] | None = None, absolute: bool = False
) -> Tensor:
    """Σ_s |rows[t, s]| (over the columns in `column_mask`), one block of rows at a time (`absolute`: the
    rows already hold |A|)."""
    out = rows.new_empty(rows.shape[0])
    for block in row_blocks(*rows.shape):
        a = rows[block] if absolute else rows[block].abs()
        out[block] = (a[:, column_mask] if column_mask is not None else a).sum(dim=1)
    return out


def influence(
    rows: Float[Tensor, "r n"],
    weights: Float[Tensor, " n"],
    row_nodes: Int[Tensor, " r"] | None = None,
    node_mask: Bool[Tensor, " n"] | None = None,
    absolute: bool = False,
) -> Float[Tensor, " n"]:
    """Σ_{k≥1} w Âᵏ, Â = |A| row-normalised, by repeated vector-matrix products streamed over row blocks.

    rows: the adjacency's rows (all of them, or only those of `row_nodes` — the nodes whose inputs are
    known so far, as while attribution is still choosing which features to expand); node_mask: the
    graph restricted to these nodes (edges into or out of other nodes dropped, as after node pruning).
    w Â = (w / row sums) |A|: the row normalisation is applied to the vector, never to a matrix copy.
    absolute: `rows` already hold |A| (attribution's budgeted selection keeps them so: taking |·| of every
    block in every product was most of its ranking time)."""
    if row_nodes is None:
        row_nodes = torch.arange(rows.shape[0], device=rows.device)
    totals = abs_row_sums(rows, node_mask, absolute)
    scale = 1.0 / totals.clamp(min=1e-10)
    if node_mask is not None:
        scale = scale * node_mask[row_nodes]
    blocks = row_blocks(*rows.shape)
    total = torch.zeros_like(weights)
    current = weights
    for _ in range(rows.shape[1] + 1):  # a DAG's longest path is shorter than its number of nodes
        x = current[row_nodes] * scale
        step = torch.zeros_like(weights)
        for block in blocks:
            if x[block].any():
                step += x[block] @ (rows[block] if absolute else rows[block].abs())
        if node_mask is not None:
            step = step * node_mask
        if not step.any():
            return total
        total += step
        current = step
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle (it must be a DAG)")


def target_weights_vector(graph: AttributionGraph) -> Float[Tensor, " n"]:
    w = torch.zeros(graph.n_nodes, dtype=graph.adjacency.dtype)
    w[graph.target_start :] = graph.target_weights.to(w.dtype)
    return w


def _cumulative_threshold(scores: Float[Tensor, " m"], keep: float) -> Tensor:
    """The smallest score among the top scores that together hold a `keep` share of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(keep, dtype=cumulative.dtype))), len(ordered) - 1
    )
    return ordered[index]


@dataclass
class PruneResult:
    node_mask: Bool[Tensor, " n"]
    edge_mask: Bool[Tensor, "n n"]
    influence: Float[Tensor, " n"]  # node influence on the targets (unpruned graph)
    cumulative_influence: Float[
        Tensor, " n"
    ]  # share of total influence held by nodes at least this influential


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the most influential nodes (to `node_threshold` of total influence; tokens and targets
    always), then the highest-scoring edges among them (score Â ⊙ (influence + w), to `edge_threshold`),
    then drop feature and error nodes left without outgoing edges, and features without incoming ones,
    until nothing changes. Only the kept nodes' sub-matrix is ever copied."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    graph.require_full_adjacency("pruning")
    w = target_weights_vector(graph)
    scores = influence(graph.adjacency, w)
    node_mask = scores >= _cumulative_threshold(scores, node_threshold)
    node_mask[graph.token_start :] = True

    # Edges among kept nodes only: the sub-matrix of the pruned graph (rows re-normalised over kept inputs).
    kept = node_mask.nonzero()[:, 0]
    sub = graph.adjacency[kept[:, None], kept[None, :]]
    sub_w = w[kept]
    normalized = normalized_abs(sub)
    edge_scores = normalized * (influence(sub, sub_w) + sub_w)[:, None]
    sub_edges = edge_scores >= _cumulative_threshold(edge_scores.flatten(), edge_threshold)

    sub_nodes = torch.ones(len(kept), dtype=torch.bool)
    internal = kept < graph.token_start  # features and errors
    features = kept < graph.n_features
    while True:
        before = sub_nodes.clone()
        sub_edges &= sub_nodes[:, None] & sub_nodes[None, :]
        sub_nodes[internal] &= sub_edges[:, internal].any(0)
        sub_nodes[features] &= sub_edges[features].any(1)
        if torch.equal(before, sub_nodes):
            break
    sub_edges &= sub_nodes[:, None] & sub_nodes[None, :]
    node_mask[kept] = sub_nodes
    edge_mask = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.bool)
    rows, columns = sub_edges.nonzero(as_tuple=True)
    edge_mask[kept[rows], kept[columns]] = True

    order = scores.sort(descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum()
    return PruneResult(node_mask, edge_mask, scores, cumulative)


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """replacement: share of the tokens' end-to-end influence on the targets that does not pass through
    error nodes, token influence / (token + error influence); completeness: influence-weighted share of
    every node's inputs that come from features or tokens rather than error nodes."""
    graph.require_full_adjacency("scoring")
    w = target_weights_vector(graph)
    scores = influence(graph.adjacency, w)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = scores[graph.token_start : graph.target_start].sum()
    error_influence = scores[errors].sum()
    error_inputs = abs_row_sums(graph.adjacency[:, errors])
    non_error_share = 1 - error_inputs / abs_row_sums(graph.adjacency).clamp(min=1e-10)
    weight = scores + w
    return {
        "replacement": float(token_influence / (token_influence + error_influence)),
        "completeness": float((non_error_share * weight).sum() / weight.sum()),
    }
