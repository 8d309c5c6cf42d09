"""Attribution graphs: the frozen model, edge invariants, circuit-tracer agreement, pruning and exports."""

from __future__ import annotations

import copy
import importlib
import json
import math
import subprocess

import networkx as nx
import pytest
import torch

from attribution.attribute import (
    SourceBlock,
    attribute,
    pack_bits,
    packed_width,
    position_groups,
    replacement_state,
    unpack_bits,
)
from attribution.frozen import FrozenGPT2
from attribution.graph import AttributionGraph
from attribution.prune import graph_scores, influence, prune
from attribution.query import (
    features_by_layer,
    strongest_paths,
    target_nodes,
    to_networkx,
    top_features_into,
)
from attribution.targets import (
    direction_target,
    language_direction,
    salient_logit_targets,
)
from clt.model import CrossLayerTranscoder
from tests.conftest import PYTHON, REPO, script_env
from tests.helpers import random_clt

# (the module, not the function `attribute` the package exports under the same name)
attribute_module = importlib.import_module("attribution.attribute")
PROMPT = "Click OK to close the dialog and apply the changes to the document"


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    clt = random_clt(model.config.n_layer, model.config.n_embd)
    tokens = torch.tensor(
        [tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    )[:24]
    return model, tokenizer, clt, tokens


@pytest.fixture(scope="module")
def graph64(setup):
    model, tokenizer, clt, tokens = setup
    return attribute(model.double(), clt, tokens, tokenizer=tokenizer, dtype=torch.float64, batch_size=16)


def target_values(
    frozen: FrozenGPT2, graph: AttributionGraph, state, token_embeddings, mlp_out
) -> torch.Tensor:
    """Each graph target's read-out in the frozen model run on the given constants: encoder · MLP input
    for feature targets, direction · final residual (last position) for logit targets."""
    mlp_in, final = frozen.forward(token_embeddings, mlp_out)
    layer, pos, feat = graph.active_features.T
    features = (mlp_in[layer, pos] * state.W_enc[layer, :, feat]).sum(-1)
    W_U = frozen.W_U
    directions = torch.stack([W_U[:, v] - W_U.mean(1) for v in graph.target_vocab_ids])
    return torch.cat([features, directions @ final[-1]])


def test_frozen_model_reproduces_the_real_model(setup):
    model, _, _, tokens = setup
    model = model.double()
    frozen = FrozenGPT2.capture(model, tokens, dtype=torch.float64)
    mlp_in, final = frozen.forward(frozen.token_embeddings, frozen.mlp_out)
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]  # the real model's, at every position
    torch.testing.assert_close(final @ frozen.W_U, logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(frozen.last_logits, logits[-1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlp_in, frozen.mlp_in, rtol=1e-10, atol=1e-10)


def test_transpose_pass_equals_autograd_through_the_frozen_forward(setup):
    """FrozenGPT2.backward — its sparse top layer and the LayerNorm folded into values and patterns
    included — against autograd through the frozen forward: reads at mixed layers and positions, their
    gradients at every MLP output below the top layer and at the token embeddings."""
    model, _, _, tokens = setup
    frozen = FrozenGPT2.capture(copy.deepcopy(model).double(), tokens, dtype=torch.float64)
    L, n, d = frozen.n_layers, frozen.n_pos, frozen.W_U.shape[0]
    layers = torch.tensor([L - 1, L - 1, 1, 0, L - 1])
    positions = torch.tensor([n - 1, 2, n - 2, 3, 0])
    vectors = torch.randn(len(layers), d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reads = [
        (layer, (layers == layer).nonzero()[:, 0], positions[layers == layer], vectors[layers == layer])
        for layer in layers.unique().tolist()
    ]
    grad_mlp_out, grad_embed = frozen.backward(reads, batch=len(layers), n_pos=n, top_layer=L - 1)
    for row in range(len(layers)):
        embeddings = frozen.token_embeddings.clone().requires_grad_(True)
        mlp_out = frozen.mlp_out.clone().requires_grad_(True)
        mlp_in, _ = frozen.forward(embeddings, mlp_out)
        (mlp_in[layers[row], positions[row]] @ vectors[row]).backward()
        torch.testing.assert_close(grad_embed[row], embeddings.grad, rtol=1e-9, atol=1e-12)
        for k in range(L - 1):
            torch.testing.assert_close(grad_mlp_out[k][row], mlp_out.grad[k], rtol=1e-9, atol=1e-12)


def test_replacement_with_error_nodes_equals_the_model(setup):
    """Freezing is real: features' reconstruction + error nodes (+ the BOS position's constant MLP
    output) reproduce the model's logits and every MLP input exactly."""
    model, _, clt, tokens = setup
    frozen = FrozenGPT2.capture(model.double(), tokens, dtype=torch.float64)
    state = replacement_state(frozen, clt)
    assert state.activations[:, 0].abs().sum() == 0 and state.errors[:, 0].abs().sum() == 0
    mlp_out = state.reconstruction + state.errors
    mlp_out[:, 0] = frozen.mlp_out[:, 0]
    mlp_in, final = frozen.forward(frozen.token_embeddings, mlp_out)
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]
    torch.testing.assert_close(final @ frozen.W_U, logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlp_in, frozen.mlp_in, rtol=1e-10, atol=1e-10)
    # and the errors are real: without them the MLP outputs differ
    assert (state.reconstruction[:, 1:] - frozen.mlp_out[:, 1:]).abs().max() > 1e-3


def bias_run_mlp_out(frozen: FrozenGPT2, clt: CrossLayerTranscoder) -> torch.Tensor:
    """MLP outputs with every source node removed: b_dec where nodes live, the true output at BOS."""
    b_dec = (clt.b_dec.detach() / clt.output_scale[:, None]).double()
    out = b_dec[:, None, :].expand_as(frozen.mlp_out).clone()
    out[:, 0] = frozen.mlp_out[:, 0]
    return out


def test_incoming_edges_sum_to_each_target(setup, graph64):
    """Σ_sources A[t, s] + (the frozen model's value with no source nodes) = target value, for every
    feature pre-activation and logit target (float64)."""
    model, _, clt, tokens = setup
    graph = graph64
    frozen = FrozenGPT2.capture(model.double(), tokens, dtype=torch.float64)
    state = replacement_state(frozen, clt)
    assert graph.n_features > 100 and graph.n_targets >= 1
    full_mlp_out = state.reconstruction + state.errors
    full_mlp_out[:, 0] = frozen.mlp_out[:, 0]
    values = target_values(frozen, graph, state, frozen.token_embeddings, full_mlp_out)
    bias = target_values(
        frozen, graph, state, torch.zeros_like(frozen.token_embeddings), bias_run_mlp_out(frozen, clt)
    )
    rows = torch.cat([graph.adjacency[: graph.n_features], graph.adjacency[graph.target_start :]])
    edge_sums = rows.sum(1)
    relative = (edge_sums + bias - values).abs() / values.abs().clamp(min=1e-3)
    assert relative.max() < 1e-4
    # and the feature targets' values are the CLT's own pre-activations (minus b_enc)
    layer, pos, feat = graph.active_features.T
    pre = torch.stack([frozen.mlp_in[l] @ state.W_enc[l] + state.b_enc[l] for l in range(frozen.n_layers)])
    torch.testing.assert_close(values[: graph.n_features] + state.b_enc[layer, feat], pre[layer, pos, feat])
    # error and token rows are empty (they have no inputs)
    assert graph.adjacency[graph.error_start : graph.target_start].abs().sum() == 0


def test_each_edge_is_the_effect_of_removing_its_source(setup, graph64):
    """Column check: removing one source node from the frozen replacement model changes every target by
    exactly minus that source's edge weights."""
    model, _, clt, tokens = setup
    graph = graph64
    frozen = FrozenGPT2.capture(model.double(), tokens, dtype=torch.float64)
    state = replacement_state(frozen, clt)
    full = state.reconstruction + state.errors
    full[:, 0] = frozen.mlp_out[:, 0]
    base = target_values(frozen, graph, state, frozen.token_embeddings, full)
    rows = torch.cat([graph.adjacency[: graph.n_features], graph.adjacency[graph.target_start :]])
    generator = torch.Generator().manual_seed(0)
    features = torch.randint(0, graph.n_features, (4,), generator=generator).tolist()
    for source in features + [graph.error_index(0, 5), graph.error_index(1, 7), graph.token_index(3)]:
        embeddings, mlp_out = frozen.token_embeddings.clone(), full.clone()
        info = graph.describe(source)
        if info["kind"] == "feature":
            l, p, f = graph.active_features[source].tolist()
            for k in range(l, frozen.n_layers):
                mlp_out[k, p] -= graph.activations[source] * state.W_dec[l][f, k - l]
        elif info["kind"] == "error":
            mlp_out[info["layer"], info["position"]] -= state.errors[info["layer"], info["position"]]
        else:
            embeddings[info["position"]] = 0
        change = target_values(frozen, graph, state, embeddings, mlp_out) - base
        torch.testing.assert_close(change, -rows[:, source], rtol=1e-8, atol=1e-10)


def test_batching_and_truncation_do_not_change_edges(setup, graph64):
    model, tokenizer, clt, tokens = setup
    other = attribute(model.double(), clt, tokens, tokenizer=tokenizer, dtype=torch.float64, batch_size=1000)
    torch.testing.assert_close(other.adjacency, graph64.adjacency, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def ct_replacement(setup, tmp_path_factory):
    """The same model and CLT loaded into circuit-tracer (TransformerLens backend), float64."""
    from attribution.circuit_tracer_bridge import circuit_tracer_model
    from clt.export import export_circuit_tracer

    model, tokenizer, clt, _ = setup
    directory = tmp_path_factory.mktemp("ct") / "clt"
    export_circuit_tracer(clt, directory)
    return circuit_tracer_model(model.double(), tokenizer, directory, dtype=torch.float64)


def test_matches_circuit_tracer(setup, graph64, ct_replacement, tmp_path):
    """circuit-tracer on the same model and CLT: same active features, same adjacency, same pruning and
    scores, and our graph JSON has its frontend's nodes and links."""
    from circuit_tracer.attribution.attribute import attribute as ct_attribute
    from circuit_tracer.frontend.graph_models import Model
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    from attribution.export import circuit_tracer_json

    model, tokenizer, clt, tokens = setup
    replacement = ct_replacement
    with torch.no_grad():
        torch.testing.assert_close(
            replacement(tokens[None])[0], model(tokens[None]).logits[0], rtol=1e-9, atol=1e-9
        )
    theirs = ct_attribute(tokens, replacement, batch_size=64)
    ours = graph64
    assert torch.equal(theirs.active_features, ours.active_features)
    torch.testing.assert_close(theirs.activation_values, ours.activations, rtol=1e-9, atol=1e-12)
    assert [t.vocab_idx for t in theirs.logit_targets] == ours.target_vocab_ids
    scale = theirs.adjacency_matrix.abs().max()
    assert (theirs.adjacency_matrix - ours.adjacency).abs().max() / scale < 1e-4
    # circuit-tracer stores edges in a float32 buffer even for float64 models: agreement is at float32
    # precision
    assert (theirs.adjacency_matrix - ours.adjacency).abs().max() / scale < 1e-6

    pruned, their_pruned = prune(ours), prune_graph(theirs)
    assert torch.equal(pruned.node_mask, their_pruned.node_mask)
    assert torch.equal(pruned.edge_mask, their_pruned.edge_mask)
    scores = graph_scores(ours)
    assert scores["replacement"] == pytest.approx(compute_graph_scores(theirs)[0], rel=1e-6)
    assert scores["completeness"] == pytest.approx(compute_graph_scores(theirs)[1], rel=1e-6)

    document = circuit_tracer_json(ours, to_networkx(ours, pruned), "t")
    Model.model_validate(document)
    theirs.cfg.tokenizer_name = str(setup[0].name_or_path)
    create_graph_files(theirs, "ref", str(tmp_path / "ref"), scan="multilingual-clt")
    reference = json.loads((tmp_path / "ref" / "ref.json").read_text())
    assert sorted(n["node_id"] for n in document["nodes"]) == sorted(n["node_id"] for n in reference["nodes"])
    ours_links = {(l["source"], l["target"]): l["weight"] for l in document["links"]}
    their_links = {(l["source"], l["target"]): l["weight"] for l in reference["links"]}
    assert ours_links.keys() == their_links.keys()
    assert max(abs(ours_links[k] - their_links[k]) for k in ours_links) <= 1e-6 * float(scale)


def test_feature_budget_matches_circuit_tracer_and_the_full_graph(setup, graph64, ct_replacement):
    """With max_feature_nodes, the same features are expanded as circuit-tracer's (rank by influence
    through the rows known so far, every update_interval batches), with the same edges; each kept row is
    the full graph's row restricted to the kept nodes; and the influence of a partial set of rows is
    circuit-tracer's partial influence."""
    from circuit_tracer.attribution.attribute import attribute as ct_attribute
    from circuit_tracer.graph import compute_partial_influences

    model, tokenizer, clt, tokens = setup
    budget = graph64.n_features // 4
    ours = attribute(
        model.double(),
        clt,
        tokens,
        tokenizer=tokenizer,
        dtype=torch.float64,
        batch_size=8,
        max_feature_nodes=budget,
        update_interval=2,
    )
    theirs = ct_attribute(tokens, ct_replacement, batch_size=8, max_feature_nodes=budget, update_interval=2)
    assert ours.n_features == budget and ours.metadata["n_active_features"] == graph64.n_features
    assert torch.equal(theirs.active_features[theirs.selected_features], ours.active_features)
    scale = theirs.adjacency_matrix.abs().max()
    assert (theirs.adjacency_matrix - ours.adjacency).abs().max() / scale < 1e-6

    kept = torch.cat(
        [
            torch.cat([(graph64.active_features == f).all(1).nonzero()[0] for f in ours.active_features]),
            torch.arange(graph64.n_features, graph64.n_nodes),
        ]
    )
    full_rows = graph64.adjacency[kept[:, None], kept[None, :]]
    expanded = torch.cat([torch.arange(budget), torch.arange(ours.target_start, ours.n_nodes)])
    torch.testing.assert_close(ours.adjacency[expanded], full_rows[expanded], rtol=1e-12, atol=1e-12)
    assert not ours.adjacency[budget : ours.target_start].any()  # errors and tokens have no inputs

    rows = graph64.adjacency[graph64.target_start :].float()  # (circuit-tracer's buffers are float32)
    row_nodes = torch.arange(graph64.target_start, graph64.n_nodes)
    weights = torch.zeros(graph64.n_nodes)
    weights[graph64.target_start :] = graph64.target_weights.float()
    torch.testing.assert_close(
        influence(rows, weights, row_nodes),
        compute_partial_influences(rows, graph64.target_weights.float(), row_nodes, device="cpu"),
    )


def test_memory_estimate_refuses_what_will_not_fit_and_says_what_would(setup):
    from attribution.memory import GB, AttributionSize, MemoryBudgetError, parse_bytes

    model, tokenizer, clt, tokens = setup
    reports = []
    graph = attribute(model, clt, tokens, tokenizer=tokenizer, report=reports.append)
    assert len(reports) == 1 and "memory estimate" in reports[0] and f"{len(tokens)} tokens" in reports[0]
    assert graph.metadata["memory_estimate_bytes"] > 0
    # Nothing fits in 1 MB, not even a graph without features: a shorter prompt is the advice.
    with pytest.raises(MemoryBudgetError, match="--max-tokens"):
        attribute(model, clt, tokens, tokenizer=tokenizer, max_memory=2**20)

    # A 1,024-token prompt of a 6-layer model: 100k active features do not fit in 8 GB; the advised
    # budget is the largest that does, and the adjacency term is what a budget shrinks.
    size = AttributionSize(
        n_pos=1024,
        n_layers=6,
        d_model=256,
        n_active=100_000,
        n_targets=10,
        budget=100_000,
        batch_size=64,
        max_group_slots=300 * 1024,
        itemsize=4,
        n_heads=8,
    )
    now = 1 * GB
    assert size.phases()["adjacency"] == (100_000 + 7 * 1024 + 10) ** 2 * 4
    estimate = size.peak_bytes(now)
    assert estimate > 8 * GB
    fits = size.largest_budget_within(8 * GB, now)
    assert 0 < fits < 100_000
    assert size.peak_bytes(now, fits) <= 8 * GB < size.peak_bytes(now, fits + 1)
    message = size.refusal(estimate, 8 * GB, now)
    assert f"--max-feature-nodes {fits}" in message and f"{estimate / GB:.2f} GB" in message
    assert size.largest_budget_within(estimate, now) == 100_000
    assert parse_bytes("1.5GB") == int(1.5 * GB) and parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_source_blocks_group_positions_by_width_and_contract_exactly(monkeypatch):
    """A site whose positions hold very different numbers of sources is split into groups padded to their
    own widths (the padding stays within a quarter of the sources or the slack), and contracting a
    gradient — over all positions or truncated to the first few — equals the direct sum per source."""
    generator = torch.Generator().manual_seed(0)
    n_pos, d = 12, 8
    counts = torch.tensor([1, 40, 3, 0, 5, 38, 2, 2, 9, 1, 0, 4])
    positions = torch.repeat_interleave(torch.arange(n_pos), counts)
    permutation = torch.randperm(len(positions), generator=generator)
    positions = positions[permutation]
    vectors = torch.randn(len(positions), d, generator=generator)
    columns = torch.randperm(200, generator=generator)[: len(positions)]
    monkeypatch.setattr(attribute_module, "GROUP_SLACK_BYTES", 4 * d * 4)  # 4 slots of slack
    block = SourceBlock(vectors, positions, columns, n_pos)
    assert len(block.groups) > 1
    covered = sorted(p for group in block.groups for p in group.position_list)
    assert covered == [p for p in range(n_pos) if counts[p] > 0]  # empty positions have no group
    for group in block.groups:
        real = int((group.columns >= 0).sum())
        assert group.columns.numel() - real <= max(real // 4, 4)
    assert sum(block.padded_slots) < n_pos * int(counts.max())  # less than one block at the widest
    for reached in (n_pos, 5, 1):
        grad = torch.randn(3, reached, d, generator=generator)
        out = torch.zeros(200, 3)  # source-major
        block.contract(grad, out)
        out = out.T
        expected = torch.zeros(3, 200)
        for vector, position, column in zip(vectors, positions.tolist(), columns.tolist()):
            if position < reached:
                expected[:, column] += grad[:, position] @ vector
        torch.testing.assert_close(out, expected)
    # with room to spare, the whole site is one group (one matmul per batch, as short prompts need)
    assert len(position_groups(counts, slot_budget=10_000)) == 1


def test_sign_bits_round_trip_at_every_width():
    """The budgeted rows keep their signs a bit per edge: packing then unpacking gives the booleans back
    for widths that are and are not whole bytes, and the bit order is the documented one."""
    generator = torch.Generator().manual_seed(0)
    for n_bits in (1, 7, 8, 9, 64, 1001):
        bits = torch.rand(5, n_bits, generator=generator) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8
        assert packed.shape == (5, packed_width(n_bits)) == (5, -(-n_bits // 8))
        assert torch.equal(unpack_bits(packed, n_bits), bits)
    # first boolean in the lowest bit: [1, 0, 1, 1, 0, 0, 0, 0, 1] → 0b00001101, 0b00000001
    row = torch.tensor([[True, False, True, True, False, False, False, False, True]])
    assert pack_bits(row).tolist() == [[13, 1]]


def test_influence_on_a_hand_made_graph():
    """token → feature → logit (weights 2 and 3) plus token → logit (1): Â rows: logit gets 3/4 from the
    feature and 1/4 from the token; the feature gets all from the token. Influence with w(logit)=1:
    feature 3/4, token 1/4 + 3/4·1 = 1."""
    # nodes: [feature, error(layer0,pos0), token, logit]
    A = torch.zeros(4, 4)
    A[0, 2] = 2.0
    A[3, 0], A[3, 2] = 3.0, -1.0
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    scores = influence(A, w)
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.0, 1.0, 0.0]))
    graph = AttributionGraph(
        tokens=torch.tensor([5]),
        token_strings=["x"],
        active_features=torch.tensor([[0, 0, 3]]),
        activations=torch.tensor([1.5]),
        adjacency=A,
        target_labels=["y"],
        target_vocab_ids=[7],
        target_weights=torch.tensor([1.0]),
        n_layers=1,
        metadata={"vocab_size": 10},
    )
    result = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert result.node_mask.tolist() == [True, False, True, True]  # the error node has no influence
    assert graph_scores(graph)["replacement"] == pytest.approx(1.0)
    g = to_networkx(graph, result)
    assert set(g.nodes) == {"F0_3@0", "E5@0", "T0"}
    assert top_features_into(g, "T0") == [("F0_3@0", 3.0)]
    assert target_nodes(g) == ["T0"]
    paths = strongest_paths(g, "E5@0", "T0", k=2)
    assert paths[0][0] == ["E5@0", "F0_3@0", "T0"] and paths[0][1] == pytest.approx(0.75)
    assert paths[1][0] == ["E5@0", "T0"] and paths[1][1] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="node_threshold"):
        prune(graph, node_threshold=1.5)


def test_cycles_are_rejected():
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(RuntimeError, match="cycle"):
        influence(A, torch.tensor([1.0, 0.0]))


def test_targets():
    W_U = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(20)
    logits[3], logits[4] = 5.0, 4.0  # p ≈ 0.69, 0.25: together past 0.9, not 0.95
    targets = salient_logit_targets(logits, W_U, max_n_logits=10, desired_logit_prob=0.9)
    assert [t.vocab_idx for t in targets] == [3, 4]
    torch.testing.assert_close(targets[0].vector, W_U[:, 3] - W_U.mean(1))
    assert len(salient_logit_targets(logits, W_U, max_n_logits=1)) == 1

    class Tok:  # word → first token id
        ids = {" Friday": [2], " vendredi": [5, 6], " Freitag": [9]}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.ids[text]}

    target = language_direction(W_U, Tok(), {"en": "Friday", "fr": "vendredi", "de": "Freitag"}, "fr")
    torch.testing.assert_close(target.vector, W_U[:, 5] - W_U[:, [2, 5, 9]].mean(1))
    with pytest.raises(ValueError, match="not among"):
        language_direction(W_U, Tok(), {"en": "Friday", "fr": "vendredi"}, "es")
    with pytest.raises(ValueError, match="zero"):
        direction_target("zero", torch.zeros(8))


def test_custom_direction_target_reads_the_final_residual(setup):
    model, tokenizer, clt, tokens = setup
    direction = torch.randn(
        model.config.n_embd, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    graph = attribute(
        model.double(), clt, tokens, [direction_target("custom", direction)], tokenizer, dtype=torch.float64
    )
    frozen = FrozenGPT2.capture(model.double(), tokens, dtype=torch.float64)
    state = replacement_state(frozen, clt)
    full = state.reconstruction + state.errors
    full[:, 0] = frozen.mlp_out[:, 0]
    _, final = frozen.forward(frozen.token_embeddings, full)
    _, bias_final = frozen.forward(torch.zeros_like(frozen.token_embeddings), bias_run_mlp_out(frozen, clt))
    value, bias = direction @ final[-1], direction @ bias_final[-1]
    assert graph.adjacency[-1].sum() + bias == pytest.approx(float(value), rel=1e-8)
    assert graph.target_vocab_ids == [-1]


def test_bad_inputs_fail_early(setup):
    model, tokenizer, clt, tokens = setup
    wrong = random_clt(model.config.n_layer + 1, model.config.n_embd)
    with pytest.raises(ValueError, match="layers"):
        attribute(model, wrong, tokens, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="context"):
        attribute(model, clt, torch.ones(model.config.n_positions + 1, dtype=torch.long), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="non-empty"):
        attribute(model, clt, torch.tensor([], dtype=torch.long), tokenizer=tokenizer)


def edges_of(g: nx.DiGraph) -> dict:
    return {(u, v): (d["weight"], d["share"]) for u, v, d in g.edges(data=True)}


def test_save_load_and_every_export_round_trip(setup, graph64, tmp_path):
    from circuit_tracer.frontend.graph_models import Model

    from attribution.export import _shown_positions, export_all

    graph = graph64
    graph.metadata["prompt"] = PROMPT
    pruned = prune(graph)
    paths = export_all(graph, tmp_path, "g", pruned)
    g = to_networkx(graph, pruned)

    # The default save keeps the pruned graph: the same networkx graph (weights and shares) comes back,
    # and the adjacency holds exactly the kept edges.
    loaded, loaded_pruned = AttributionGraph.load_with_pruning(paths["graph"])
    assert loaded.adjacency_kept == "pruned"
    assert torch.equal(loaded.active_features, graph.active_features)
    assert torch.equal(loaded.adjacency, torch.where(pruned.edge_mask, graph.adjacency, 0.0))
    for name in ("node_mask", "edge_mask", "influence", "cumulative_influence"):
        assert torch.equal(getattr(loaded_pruned, name), getattr(pruned, name)), name
    back_g = to_networkx(loaded, loaded_pruned)
    assert dict(back_g.nodes(data=True)) == dict(g.nodes(data=True))
    assert edges_of(back_g) == edges_of(g)
    assert loaded.target_labels == graph.target_labels and loaded.metadata["prompt"] == PROMPT
    with pytest.raises(ValueError, match="pruned edges"):
        prune(loaded)
    with pytest.raises(ValueError, match="pruned edges"):
        loaded.save(tmp_path / "again", loaded_pruned, "float32")

    # The full adjacency on request, in each format; a graph saved without a pruning loads without one.
    for form in ("sparse", "float16", "float32"):
        graph.save(tmp_path / form, pruned if form != "float32" else None, form)
        full, full_pruned = AttributionGraph.load_with_pruning(tmp_path / form)
        assert full.adjacency_kept == "full"
        if form == "float16":
            torch.testing.assert_close(
                full.adjacency.double(),
                graph.adjacency,
                rtol=1e-3,
                atol=1e-3 * float(graph.adjacency.abs().max()),
            )
        else:
            assert torch.equal(full.adjacency, graph.adjacency)
        assert (full_pruned is None) == (form == "float32")
    pruned_bytes = (paths["graph"] / "graph.safetensors").stat().st_size
    assert pruned_bytes < (tmp_path / "float32" / "graph.safetensors").stat().st_size / 3
    with pytest.raises(ValueError, match="needs the PruneResult"):
        graph.save(tmp_path / "x", None, "pruned")

    back = nx.read_graphml(paths["graphml"])
    assert set(back.nodes) == set(g.nodes) and back.number_of_edges() == g.number_of_edges()
    for u, v, data in g.edges(data=True):
        assert back.edges[u, v]["weight"] == pytest.approx(data["weight"])
    for node, data in g.nodes(data=True):
        assert back.nodes[node]["kind"] == data["kind"]

    document = json.loads(paths["circuit_tracer_json"].read_text())
    Model.model_validate(document)
    assert len(document["nodes"]) == g.number_of_nodes() and len(document["links"]) == g.number_of_edges()
    index = json.loads((paths["circuit_tracer_json"].parent / "graph-metadata.json").read_text())
    assert [entry["slug"] for entry in index["graphs"]] == ["g"]

    # The pictures draw only positions that keep nodes: every node there, and every edge.
    shown = set(_shown_positions(g))
    drawn = [n for n, d in g.nodes(data=True) if d["position"] in shown]
    assert all(d["kind"] == "token" and g.degree(n) == 0 for n, d in g.nodes(data=True) if n not in drawn)
    page = paths["html"].read_text()
    assert page.count("<circle") == len(drawn) and page.count("<line") == g.number_of_edges()
    assert f"{len(shown)} of {graph.n_pos} positions keep nodes" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert paths["png"].stat().st_size > 10_000
    assert pruned.node_mask[graph.token_start :].all()  # tokens and targets are always kept
    layers = features_by_layer(g)
    assert all(isinstance(f, int) for feats in layers.values() for f in feats)


def test_attribute_script_writes_graphs_and_resumes(setup, tiny_model_dir, tmp_path):
    from clt.export import save_native
    from training.fingerprint import model_fingerprint

    _, _, clt, _ = setup
    clt_dir = save_native(
        clt,
        tmp_path / "clt",
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"text": PROMPT, "lang": "en"})
        + "\n"
        + json.dumps({"text": "Cliquez sur OK pour fermer la boîte", "lang": "fr"})
        + "\n"
    )
    command = [
        PYTHON,
        str(REPO / "scripts" / "attribute.py"),
        "--model",
        str(tiny_model_dir),
        "--clt",
        str(clt_dir),
        "--prompts",
        str(prompts),
        "--run-dir",
        str(tmp_path / "run"),
        "--max-tokens",
        "20",
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["slug"] for r in records] == ["000-en", "001-fr"]
    assert all(r["n_tokens"] <= 20 and 0 < r["replacement"] <= 1 for r in records)
    for slug in ("000-en", "001-fr"):
        assert (tmp_path / "run" / "graphs" / slug / f"{slug}.html").exists()
    again = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # nothing redone
    # the CLT replaced at the same path: the finished graphs would be stale, so the run is refused
    retrained = copy.deepcopy(clt)  # the fixture's CLT is shared with other tests: leave it untouched
    with torch.no_grad():
        retrained.b_dec.add_(1.0)
    save_native(
        retrained,
        clt_dir,
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    stale = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert stale.returncode == 2 and "computed from another clt" in stale.stderr

    # a CLT trained on other weights is refused unless explicitly allowed
    other = save_native(clt, tmp_path / "clt-other", {"model_sha256": "0" * 64})
    refused = subprocess.run(
        command[:5] + [str(other)] + command[6:-4] + ["--run-dir", str(tmp_path / "r2")],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "weights differ" in refused.stderr

    # a prompt over the memory allowed is refused in one line naming the estimate and what would fit
    too_big = subprocess.run(
        command[:-4] + ["--run-dir", str(tmp_path / "r3"), "--max-tokens", "20", "--max-memory", "1MB"],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = too_big.stderr.strip().splitlines()[-1]
    assert too_big.returncode == 2 and "--max-memory" in last and "GB" in last and "--max-tokens" in last
    assert "Traceback" not in too_big.stderr


def test_overlap_measures_and_null():
    from attribution.overlap import derangement, overlap_by_layer, set_overlap

    assert set_overlap({1, 2, 3}, {2, 3, 4, 5}) == (pytest.approx(2 / 5), pytest.approx(2 / 4))
    assert set_overlap(set(), set()) is None  # undefined, left out of the means
    assert set_overlap({1}, set()) == (0.0, 0.0)
    order = derangement(7, seed=3)
    assert sorted(order) == list(range(7)) and all(i != j for i, j in enumerate(order))
    with pytest.raises(ValueError):
        derangement(1, seed=0)
    # identical feature sets for the same paragraph in both languages, disjoint across paragraphs:
    # parallel overlap 1, null 0, in every layer that has features.
    features = {lang: [{0: {10 * i, 10 * i + 1}, 1: {100 + i}} for i in range(5)] for lang in ("en", "fr")}
    result = overlap_by_layer(features, n_layers=3)  # layer 2: no features anywhere → undefined
    assert result["all"]["jaccard"][:2] == [1.0, 1.0] and result["all"]["null_jaccard"][:2] == [0.0, 0.0]
    assert math.isnan(result["all"]["jaccard"][2]) and result["n_defined_pairs"]["jaccard"] == [5, 5, 0]
    assert result["pairs"]["en-fr"]["ratio"][:2] == [1.0, 1.0]
    # one language using a superset: Jaccard < ratio
    features["fr"] = [{0: {10 * i, 10 * i + 1, 999}, 1: {100 + i}} for i in range(5)]
    result = overlap_by_layer(features, n_layers=2)
    assert result["all"]["jaccard"][0] == pytest.approx(2 / 3) and result["all"]["ratio"][0] == pytest.approx(
        2 / 3
    )
    assert result["all"]["null_jaccard"][0] == 0.0


def test_parallel_sets(real_slice_corpus_dir):
    from training.corpus.build import load_corpus, parallel_sets

    sets = parallel_sets(load_corpus(real_slice_corpus_dir), ["en", "fr"])
    assert len(sets) == 40 and all(set(texts) == {"en", "fr"} for texts in sets.values())
    with pytest.raises(ValueError, match=r"no text in \['ru'\] in the corpus's parallel split"):
        parallel_sets(load_corpus(real_slice_corpus_dir), ["en", "ru"])
