"""The pruned graph as a `networkx.DiGraph`, and the questions people ask of it.

Node ids are ours (`node_id`); each node also carries circuit-tracer's frontend id (`ct_node_id`):
features `"{layer}_{feature}_{pos}"`, errors
`"0_{layer}_{pos}"`, tokens `"E_{token_id}_{pos}"`, targets `"{n_layers+1}_{vocab_idx}_{pos}"`
(custom directions have no token: circuit-tracer's virtual index `vocab_size + target number`).
Edges run source → target with attributes `weight` (the direct effect) and `share` (|weight| over the
target's total |input|, in the unpruned graph).
"""

from __future__ import annotations

import networkx as nx

from attribution.graph import AttributionGraph
from attribution.prune import PruneResult, prune


def node_id(graph: AttributionGraph, index: int) -> str:
    """Unambiguous id of a node in our networkx graphs: `F{layer}_{feature}@{pos}` (feature),
    `X{layer}@{pos}` (error), `E{token_id}@{pos}` (token), `T{target number}` (target)."""
    info = graph.describe(index)
    kind = info["kind"]
    if kind == "feature":
        return f"F{info['layer']}_{info['feature']}@{info['position']}"
    if kind == "error":
        return f"X{info['layer']}@{info['position']}"
    if kind == "token":
        return f"E{info['token_id']}@{info['position']}"
    return f"T{index - graph.target_start}"


def circuit_tracer_node_id(graph: AttributionGraph, index: int) -> str:
    """circuit-tracer's frontend id (see module docstring). Its scheme can collide (feature f of layer 0
    at position p and the error node of layer f at p are both `0_f_p`), hence our own ids above."""
    info = graph.describe(index)
    kind = info["kind"]
    if kind == "feature":
        return f"{info['layer']}_{info['feature']}_{info['position']}"
    if kind == "error":
        return f"0_{info['layer']}_{info['position']}"
    if kind == "token":
        return f"E_{info['token_id']}_{info['position']}"
    vocab = (
        info["token_id"]
        if info["token_id"] >= 0
        else graph.metadata["vocab_size"] + index - graph.target_start
    )
    return f"{graph.n_layers + 1}_{vocab}_{info['position']}"


def to_networkx(
    graph: AttributionGraph,
    pruned: PruneResult | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> nx.DiGraph:
    """Typed, attributed DiGraph of the pruned graph (pruning with the given thresholds if no
    `PruneResult` is passed; pass `prune(graph, 1.0, 1.0)` for (almost) everything)."""
    if pruned is None:
        pruned = prune(graph, node_threshold, edge_threshold)
    g = nx.DiGraph(
        prompt=graph.metadata.get("prompt", ""),
        lang=graph.metadata.get("lang") or "",
        n_layers=graph.n_layers,
        n_pos=graph.n_pos,
    )
    lang = graph.metadata.get("lang")
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    ids = {}
    for index in kept:
        info = graph.describe(index)
        info.update(
            index=index,
            ct_node_id=circuit_tracer_node_id(graph, index),
            influence=float(pruned.influence[index]),
            cumulative_influence=float(pruned.cumulative_influence[index]),
        )
        if lang:
            info["lang"] = lang  # the prompt's language: what the cross-lingual analyses group by
        ids[index] = node_id(graph, index)
        g.add_node(ids[index], **info)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    shares = (weights.abs() / graph.input_totals()[targets].clamp(min=1e-10)).tolist()
    weights = weights.tolist()
    for t, s, w, share in zip(targets.tolist(), sources.tolist(), weights, shares):
        g.add_edge(ids[s], ids[t], weight=float(w), share=float(share))
    return g


def top_inputs(g: nx.DiGraph, node: str, k: int = 10, kind: str | None = None) -> list[tuple[str, float]]:
    """The k strongest direct inputs into `node` (by |weight|), optionally only of one kind."""
    edges = [
        (source, data["weight"])
        for source, _, data in g.in_edges(node, data=True)
        if kind is None or g.nodes[source]["kind"] == kind
    ]
    return sorted(edges, key=lambda item: -abs(item[1]))[:k]


def top_features_into(g: nx.DiGraph, node: str, k: int = 10) -> list[tuple[str, float]]:
    return top_inputs(g, node, k, kind="feature")


def target_nodes(g: nx.DiGraph) -> list[str]:
    return [n for n, data in g.nodes(data=True) if data["kind"] == "target"]


def strongest_paths(g: nx.DiGraph, source: str, target: str, k: int = 5) -> list[tuple[list[str], float]]:
    """The k paths from `source` to `target` with the largest product of edge `share`s (each edge's
    share of its target's total |input|, so a path's product is the fraction of the target it carries
    through that chain). Shares are ≤ 1, so −log(share) ≥ 0 and Yen's algorithm applies."""
    import itertools
    import math

    cost = nx.DiGraph()
    cost.add_edges_from(
        (u, v, {"cost": -math.log(d["share"])}) for u, v, d in g.edges(data=True) if d["share"] > 0
    )
    if source not in cost or target not in cost or not nx.has_path(cost, source, target):
        return []
    paths = itertools.islice(nx.shortest_simple_paths(cost, source, target, weight="cost"), k)
    return [(path, math.prod(g.edges[u, v]["share"] for u, v in zip(path, path[1:]))) for path in paths]


def features_by_layer(g: nx.DiGraph) -> dict[int, set[int]]:
    """Layer → set of feature indices present (at any position): the unit of cross-lingual overlap."""
    layers: dict[int, set[int]] = {}
    for _, data in g.nodes(data=True):
        if data["kind"] == "feature":
            layers.setdefault(data["layer"], set()).add(data["feature"])
    return layers
