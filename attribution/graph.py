"""The attribution graph: a dense adjacency over typed nodes, saved as safetensors + JSON.

Node order is circuit-tracer's, so adjacency matrices compare entry by entry:
    [active features (layer, position, feature) sorted, error nodes (layer-major, then position),
     token nodes (position), logit targets]
`adjacency[target, source]` is the direct effect of source on target (rows are targets). Error and
token nodes have no incoming edges (zero rows).
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

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (GRAPH_WEIGHTS + ".tmp")
        save_file(
            {
                "tokens": self.tokens.cpu().contiguous(),
                "active_features": self.active_features.cpu().contiguous(),
                "activations": self.activations.cpu().contiguous(),
                "adjacency": self.adjacency.cpu().contiguous(),
                "target_weights": self.target_weights.cpu().contiguous(),
            },
            str(tmp),
        )
        tmp.replace(out_dir / GRAPH_WEIGHTS)
        atomic_write_json(
            out_dir / GRAPH_META,
            {
                "token_strings": self.token_strings,
                "target_labels": self.target_labels,
                "target_vocab_ids": self.target_vocab_ids,
                "n_layers": self.n_layers,
                "metadata": self.metadata,
            },
        )
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        path = Path(path)
        if not (path / GRAPH_WEIGHTS).exists():
            raise FileNotFoundError(f"{path} holds no {GRAPH_WEIGHTS}: not a saved attribution graph")
        tensors = load_file(str(path / GRAPH_WEIGHTS))
        meta = json.loads((path / GRAPH_META).read_text())
        return cls(
            tokens=tensors["tokens"],
            token_strings=meta["token_strings"],
            active_features=tensors["active_features"],
            activations=tensors["activations"],
            adjacency=tensors["adjacency"],
            target_labels=meta["target_labels"],
            target_vocab_ids=meta["target_vocab_ids"],
            target_weights=tensors["target_weights"],
            n_layers=meta["n_layers"],
            metadata=meta["metadata"],
        )
