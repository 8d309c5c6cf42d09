"""Attribution graphs over the CLT replacement model (see attribution/attribute.py for the method)."""

from attribution.attribute import attribute
from attribution.graph import AttributionGraph
from attribution.pipeline import build_graph, load_model_and_clt, prompt_tokens
from attribution.prune import graph_scores, prune
from attribution.query import (
    features_by_layer,
    strongest_paths,
    to_networkx,
    top_features_into,
    top_inputs,
)
from attribution.targets import (
    Target,
    direction_target,
    language_direction,
    salient_logit_targets,
    token_target,
)

__all__ = [
    "AttributionGraph",
    "Target",
    "attribute",
    "build_graph",
    "direction_target",
    "features_by_layer",
    "graph_scores",
    "language_direction",
    "load_model_and_clt",
    "prompt_tokens",
    "prune",
    "salient_logit_targets",
    "strongest_paths",
    "to_networkx",
    "token_target",
    "top_features_into",
    "top_inputs",
]
