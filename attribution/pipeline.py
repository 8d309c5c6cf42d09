"""From a model directory, a CLT directory and a prompt to a pruned, scored graph — the notebook API.

from attribution import load_model_and_clt, build_graph, to_networkx, top_features_into
model, tokenizer, clt = load_model_and_clt("runs/pretrain-tiny-en-heavy/model", "runs/clt-tiny-en-heavy/clt")
graph, pruned = build_graph(model, tokenizer, clt, "Der Dialog wird mit OK", lang="de")
g = to_networkx(graph, pruned)
top_features_into(g, "T0")
graph.save("graphs/dialog-de"); AttributionGraph.load("graphs/dialog-de")
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Int
from torch import Tensor

from attribution.attribute import attribute
from attribution.graph import AttributionGraph
from attribution.prune import PruneResult, graph_scores, prune
from attribution.targets import (
    Target,
    language_direction,
    salient_logit_targets,
    token_target,
)
from clt.export import load_model_and_clt
from training.errors import UserError


def prompt_tokens(
    tokenizer, text: str, max_tokens: int | None = None, n_ctx: int | None = None
) -> Int[Tensor, " pos"]:
    """BOS followed by the prompt's tokens, at most `max_tokens` (and the model's context `n_ctx`) in all.

    A longer prompt keeps its start, with a warning that says how many tokens were dropped; asking for
    more tokens than the model's context is refused."""
    if not text.strip():
        raise UserError("empty prompt")
    if max_tokens is not None and n_ctx is not None and max_tokens > n_ctx:
        raise UserError(
            f"--max-tokens {max_tokens} exceeds the model's context of {n_ctx} tokens; use at most {n_ctx}"
        )
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    limit = max_tokens or n_ctx
    if limit is not None and len(ids) > limit:
        warnings.warn(
            f"prompt of {len(ids)} tokens (BOS included) cut to its first {limit}: {len(ids) - limit} tokens "
            f"dropped (raise --max-tokens, up to the model's context of {n_ctx or 'its'} tokens, or shorten "
            "the prompt)",
            stacklevel=2,
        )
        ids = ids[:limit]
    return torch.tensor(ids)


def resolve_targets(
    spec: str,
    model,
    tokenizer,
    tokens: Int[Tensor, " pos"],
    translations: dict[str, str] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> list[Target]:
    """`salient` (top logits), `token:TEXT` (that token's logit; TEXT's first token), or `lang:XX`
    (language direction over `translations`, e.g. {"en": "Friday", "fr": "vendredi", "de": "Freitag"})."""
    W_U = model.lm_head.weight.detach().T
    if spec == "salient":
        return []  # attribute() picks them from the logits it computes anyway
    if spec.startswith("lang:"):
        if not translations:
            raise ValueError(
                "a lang:XX target needs translations of one word, e.g. "
                '--translations \'{"en": "Friday", "fr": "vendredi", "de": "Freitag"}\''
            )
        return [language_direction(W_U, tokenizer, translations, spec.removeprefix("lang:"))]
    if spec.startswith("token:"):
        ids = tokenizer(spec.removeprefix("token:"), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"target {spec!r} tokenises to nothing")
        with torch.no_grad():
            logits = model(input_ids=tokens[None].to(model.device)).logits[0, -1]
        return [token_target(ids[0], logits, W_U, tokenizer)]
    raise ValueError(f"unknown target {spec!r}: use salient, token:TEXT or lang:XX")


def build_graph(
    model,
    tokenizer,
    clt,
    prompt: str | Tensor,
    *,
    target: str = "salient",
    translations: dict | None = None,
    lang: str | None = None,
    max_tokens: int | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    max_feature_nodes: int | None = None,
    max_memory: int | None = None,
    report=None,
) -> tuple[AttributionGraph, PruneResult]:
    tokens = (
        prompt
        if isinstance(prompt, Tensor)
        else prompt_tokens(tokenizer, prompt, max_tokens, model.config.n_positions)
    )
    targets = (
        resolve_targets(target, model, tokenizer, tokens, translations, max_n_logits, desired_logit_prob)
        or None
    )
    text = prompt if isinstance(prompt, str) else tokenizer.decode(tokens[1:].tolist())
    graph = attribute(
        model,
        clt,
        tokens,
        targets,
        tokenizer,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        batch_size=batch_size,
        dtype=dtype,
        progress=progress,
        metadata={"prompt": text, "lang": lang, "target": target},
        max_feature_nodes=max_feature_nodes,
        max_memory=max_memory,
        report=report,
    )
    pruned = prune(graph, node_threshold, edge_threshold)
    graph.metadata["scores"] = graph_scores(graph)
    graph.metadata["pruning"] = {
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "nodes_kept": int(pruned.node_mask.sum()),
        "edges_kept": int(pruned.edge_mask.count_nonzero()),  # (.sum() would make an int64 copy)
    }
    return graph, pruned


__all__ = ["build_graph", "load_model_and_clt", "prompt_tokens", "resolve_targets", "salient_logit_targets"]
