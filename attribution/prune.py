"""Influence, pruning and graph scores (docs/methods.md §3, after Ameisen et al. 2025).

Â = |A| with rows normalised to sum 1 (each target's inputs as shares). A node's influence on the
targets is Σ_{k≥1} w Âᵏ — every path, weighted by the targets' weights w (logit probabilities) — which
terminates because the graph is acyclic (Âᵏ = 0 beyond the longest path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attribution.graph import AttributionGraph


def normalized_abs(adjacency: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: Float[Tensor, "n n"], weights: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Σ_{k≥1} w Âᵏ by repeated vector-matrix products."""
    total = torch.zeros_like(weights)
    current = weights @ normalized
    for _ in range(normalized.shape[0] + 1):
        if not current.any():
            return total
        total = total + current
        current = current @ normalized
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
    until nothing changes."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    graph.require_full_adjacency("pruning")
    w = target_weights_vector(graph)
    scores = influence(normalized_abs(graph.adjacency), w)
    node_mask = scores >= _cumulative_threshold(scores, node_threshold)
    node_mask[graph.token_start :] = True

    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalized_abs(pruned)
    edge_scores = normalized * (influence(normalized, w) + w)[:, None]
    edge_mask = edge_scores >= _cumulative_threshold(edge_scores.flatten(), edge_threshold)

    internal = slice(0, graph.token_start)  # features and errors
    features = slice(0, graph.n_features)
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[internal] &= edge_mask[:, internal].any(0)
        node_mask[features] &= edge_mask[features].any(1)
        if torch.equal(before, node_mask):
            break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False

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
    normalized = normalized_abs(graph.adjacency)
    scores = influence(normalized, w)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = scores[graph.token_start : graph.target_start].sum()
    error_influence = scores[errors].sum()
    non_error_share = 1 - normalized[:, errors].sum(dim=1)
    weight = scores + w
    return {
        "replacement": float(token_influence / (token_influence + error_influence)),
        "completeness": float((non_error_share * weight).sum() / weight.sum()),
    }
