"""The attribution graph: a dense adjacency over typed nodes, saved as safetensors + JSON.

Node order is circuit-tracer's, so adjacency matrices compare entry by entry:
    [active features (layer, position, feature) sorted, error nodes (layer-major, then position),
     token nodes (position), logit targets]
`adjacency[target, source]` is the direct effect of source on target (rows are targets). Error and
token nodes have no incoming edges (zero rows).

On disk (`save`), what users read is kept by default: the active-feature table, the pruned graph's
edges (sparse) and node scores, and each node's total |input| — a few MB where the dense float32
adjacency of a 128-token prompt is hundreds. The full adjacency is kept only on request, as `sparse`
(its non-zero entries), `float16` or `float32`. A graph loaded from a pruned save holds only the kept
edges (`adjacency_kept == "pruned"`); re-pruning or re-scoring it is refused, since that needs every edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from training.config import atomic_write_json

GRAPH_WEIGHTS = "graph.safetensors"
GRAPH_META = "graph.json"
ADJACENCY_FORMATS = ("pruned", "sparse", "float16", "float32")
FLOAT16_MAX = 65504.0


@dataclass
class AttributionGraph:
    tokens: Int[Tensor, " pos"]
    token_strings: list[str]
    active_features: Int[Tensor, "n_features 3"]  # (layer, position, feature index)
    activations: Float[Tensor, " n_features"]
    adjacency: Float[Tensor, "nodes nodes"]
    target_labels: list[str]
    target_vocab_ids: list[int]  # -1 for custom directions
    target_weights: Float[Tensor, " n_targets"]
    n_layers: int
    metadata: dict = field(default_factory=dict)  # prompt, language, model/CLT paths and hashes, timings
    # "full", or "pruned" when only the pruned graph's edges were loaded; then `input_totals` is what the
    # full graph's rows summed to, so edge shares read the same as before saving.
    adjacency_kept: str = "full"
    stored_input_totals: Float[Tensor, " nodes"] | None = None

    def input_totals(self) -> Float[Tensor, " nodes"]:
        """Σ_s |adjacency[t, s]| for every node t: the denominator of an edge's share of its input."""
        if self.stored_input_totals is not None:
            return self.stored_input_totals
        return self.adjacency.abs().sum(dim=1)

    def require_full_adjacency(self, what: str) -> None:
        if self.adjacency_kept != "full":
            raise ValueError(
                f"{what} needs every edge, but this graph was saved with only its pruned edges; "
                "rebuild it, or save with --save-adjacency sparse|float16|float32"
            )

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.active_features)

    @property
    def n_targets(self) -> int:
        return len(self.target_labels)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    # index helpers: where each kind of node starts
    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def target_start(self) -> int:
        return self.token_start + self.n_pos

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.token_start + pos

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        match = ((self.active_features == torch.tensor([layer, pos, feature])).all(dim=1)).nonzero()
        if len(match) == 0:
            raise KeyError(f"feature {feature} of layer {layer} is not active at position {pos}")
        return int(match[0, 0])

    def node_kind(self, index: int) -> str:
        if index < self.error_start:
            return "feature"
        if index < self.token_start:
            return "error"
        if index < self.target_start:
            return "token"
        return "target"

    def describe(self, index: int) -> dict:
        """Typed attributes of one node (what the networkx graph and exports carry)."""
        kind = self.node_kind(index)
        if kind == "feature":
            layer, pos, feature = self.active_features[index].tolist()
            return {
                "kind": kind,
                "layer": layer,
                "position": pos,
                "feature": feature,
                "activation": float(self.activations[index]),
                "token": self.token_strings[pos],
            }
        if kind == "error":
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return {"kind": kind, "layer": layer, "position": pos, "token": self.token_strings[pos]}
        if kind == "token":
            pos = index - self.token_start
            return {
                "kind": kind,
                "layer": -1,
                "position": pos,
                "token": self.token_strings[pos],
                "token_id": int(self.tokens[pos]),
            }
        t = index - self.target_start
        return {
            "kind": kind,
            "layer": self.n_layers,
            "position": self.n_pos - 1,
            "token": self.target_labels[t],
            "token_id": self.target_vocab_ids[t],
            "weight": float(self.target_weights[t]),
        }

    # --- persistence ---------------------------------------------------------------------------

    def save(self, out_dir: str | Path, pruned=None, adjacency: str = "pruned") -> Path:
        """Write `graph.safetensors` + `graph.json` into `out_dir`. `pruned` (a `PruneResult`) is stored
        with the graph when given; `adjacency` is one of ADJACENCY_FORMATS ("pruned" needs `pruned`)."""
        if adjacency not in ADJACENCY_FORMATS:
            raise ValueError(f"adjacency must be one of {', '.join(ADJACENCY_FORMATS)}, got {adjacency!r}")
        if adjacency == "pruned" and pruned is None:
            raise ValueError("saving only the pruned edges needs the PruneResult (pass pruned=...)")
        if adjacency != "pruned":
            self.require_full_adjacency(f"saving the adjacency as {adjacency}")
        tensors = {
            "tokens": self.tokens,
            "active_features": self.active_features.to(torch.int32),
            "activations": self.activations,
            "target_weights": self.target_weights,
            "input_totals": self.input_totals(),
        }
        if pruned is not None:
            rows, columns = pruned.edge_mask.nonzero(as_tuple=True)
            tensors.update(
                node_mask=pruned.node_mask.to(torch.uint8),
                influence=pruned.influence,
                cumulative_influence=pruned.cumulative_influence,
                pruned_edges=torch.stack([rows, columns]).to(torch.int32),
            )
            if adjacency == "pruned":
                tensors["pruned_weights"] = self.adjacency[rows, columns]
        if adjacency == "sparse":
            rows, columns = self.adjacency.nonzero(as_tuple=True)
            tensors["adjacency_index"] = torch.stack([rows, columns]).to(torch.int32)
            tensors["adjacency_values"] = self.adjacency[rows, columns]
        elif adjacency == "float16":
            largest = float(self.adjacency.abs().max()) if self.adjacency.numel() else 0.0
            if largest > FLOAT16_MAX:
                raise ValueError(f"an edge of {largest:.3g} overflows float16; save as float32 or sparse")
            tensors["adjacency"] = self.adjacency.to(torch.float16)
        elif adjacency == "float32":
            tensors["adjacency"] = self.adjacency
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (GRAPH_WEIGHTS + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(out_dir / GRAPH_WEIGHTS)
        atomic_write_json(
            out_dir / GRAPH_META,
            {
                "token_strings": self.token_strings,
                "target_labels": self.target_labels,
                "target_vocab_ids": self.target_vocab_ids,
                "n_layers": self.n_layers,
                "n_nodes": self.n_nodes,
                "adjacency_format": adjacency,
                "metadata": self.metadata,
            },
        )
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        return cls.load_with_pruning(path)[0]

    @classmethod
    def load_with_pruning(cls, path: str | Path):
        """(graph, PruneResult or None): the graph as saved, and its pruning if one was saved with it."""
        from attribution.prune import PruneResult

        path = Path(path)
        if not (path / GRAPH_WEIGHTS).exists():
            raise FileNotFoundError(f"{path} holds no {GRAPH_WEIGHTS}: not a saved attribution graph")
        tensors = load_file(str(path / GRAPH_WEIGHTS))
        meta = json.loads((path / GRAPH_META).read_text())
        form = meta.get("adjacency_format", "float32")  # graphs saved before the formats were dense
        n = meta.get("n_nodes")
        if form in ("float16", "float32"):
            adjacency = tensors["adjacency"]
        else:
            dtype = tensors["activations"].dtype
            adjacency = torch.zeros(n, n, dtype=dtype)
            index, values = (
                ("adjacency_index", "adjacency_values")
                if form == "sparse"
                else ("pruned_edges", "pruned_weights")
            )
            rows, columns = tensors[index].long()
            adjacency[rows, columns] = tensors[values].to(dtype)
        graph = cls(
            tokens=tensors["tokens"],
            token_strings=meta["token_strings"],
            active_features=tensors["active_features"].long(),
            activations=tensors["activations"],
            adjacency=adjacency,
            target_labels=meta["target_labels"],
            target_vocab_ids=meta["target_vocab_ids"],
            target_weights=tensors["target_weights"],
            n_layers=meta["n_layers"],
            metadata=meta["metadata"],
            adjacency_kept="pruned" if form == "pruned" else "full",
            stored_input_totals=tensors.get("input_totals") if form == "pruned" else None,
        )
        pruned = None
        if "node_mask" in tensors:
            edge_mask = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.bool)
            rows, columns = tensors["pruned_edges"].long()
            edge_mask[rows, columns] = True
            pruned = PruneResult(
                tensors["node_mask"].bool(), edge_mask, tensors["influence"], tensors["cumulative_influence"]
            )
        return graph, pruned
