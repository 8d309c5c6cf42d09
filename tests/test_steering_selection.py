"""Issue #13 on cases whose answer is known: feature selection strategies, steering recipes, the
fluency-matched frontier and the oracle / span diagnostics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from analysis.feature_selection import (
    cumulative_writes,
    diffmean_directions,
    graph_feature_scores,
    nonnegative_pursuit,
    oracle_features,
    select_aligned,
    select_output,
    span_share,
)
from analysis.output_features import language_readouts
from interventions.frontier import bootstrap_mean, success_at_budget
from interventions.hooks import FeatureEdit, Intervener, Where
from interventions.steering import RECIPES, LanguageUnits, Recipe, parse_method, plan
from tests.helpers import random_clt, tiny_gpt2
from tests.test_output_features import LANGS, TOKENS, hand_weights  # the same hand-made token sets


def plant_write(clt, layer: int, feature: int, direction: torch.Tensor) -> None:
    """Feature (layer, feature) writes `direction` in all, spread evenly over its target layers."""
    n_targets = clt.n_targets(layer)
    with torch.no_grad():
        for t in range(n_targets):
            clt.W_dec[layer][feature, t] = direction / n_targets * clt.output_scale[layer + t]


# --- selection ---------------------------------------------------------------------------------------


def test_output_strategy_ranks_a_feature_writing_exactly_a_language_readout_first(slice_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=3)
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=8)
    weights = hand_weights(len(tokenizer))
    readout = language_readouts(model, weights)[LANGS.index("de")]
    # through ln_f (centring × weight) the written direction must come out as the German read-out
    gamma = model.transformer.ln_f.weight.detach()
    plant_write(clt, 1, 6, 50 * readout / gamma)
    ranked = select_output(model, clt, weights, LANGS, per_lang=3, inverse_scale=2.0)
    assert (ranked["de"][0]["layer"], ranked["de"][0]["feature"]) == (1, 6)
    # language_readouts is the margin direction: w_de − mean(w_en, w_fr) through W_U
    W_U = model.lm_head.weight.detach()
    expected = W_U[TOKENS["de"]].mean(0) - (W_U[TOKENS["en"]].mean(0) + W_U[TOKENS["fr"]].mean(0)) / 2
    torch.testing.assert_close(readout, expected, rtol=1e-5, atol=1e-6)


def test_attribution_ranking_on_a_planted_graph():
    """Scores = direct attribution into the target summed over a feature's positions; features absent
    from a graph get 0 and are not counted as active."""
    from attribution.graph import AttributionGraph

    active = torch.tensor([[0, 1, 2], [0, 2, 2], [1, 1, 0], [1, 2, 3]])  # (layer, pos, feature)
    n_feat, L, n_pos = len(active), 2, 3
    n = n_feat + L * n_pos + n_pos + 1
    adjacency = torch.zeros(n, n)
    adjacency[-1, :n_feat] = torch.tensor([0.5, 0.25, -1.0, 2.0])
    graph = AttributionGraph(
        tokens=torch.tensor([1, 5, 6]),
        token_strings=["<s>", "a", "b"],
        active_features=active,
        activations=torch.ones(n_feat),
        adjacency=adjacency,
        target_labels=["lang:fr"],
        target_vocab_ids=[-1],
        target_weights=torch.ones(1),
        n_layers=L,
    )
    scores, present = graph_feature_scores(graph, n_features=4)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[0, 2], expected[1, 0], expected[1, 3] = 0.75, -1.0, 2.0
    torch.testing.assert_close(scores, expected)
    assert present.sum() == 3 and present[0, 2] == 1 and present[0, 0] == 0


def test_attribution_scores_match_the_full_graph_and_rank_a_planted_writer(slice_tokenizer_dir):
    """targets_only gives the same target row as the full graph; a feature that is always active and
    writes the read-out direction straight into the last layer ranks first."""
    from analysis.feature_selection import attribution_scores
    from attribution.attribute import attribute
    from attribution.targets import direction_target

    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=4).eval()
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=8)
    readout = language_readouts(model, hand_weights(len(tokenizer)))[1]
    last = model.config.n_layer - 1
    with torch.no_grad():
        clt.b_enc[last, 7] = 50.0  # always on
        clt.W_enc[last][:, 7] = 0.0
    plant_write(clt, last, 7, 20 * readout / model.transformer.ln_f.weight.detach())
    prompts = torch.randint(2, 400, (3, 6), generator=torch.Generator().manual_seed(1))
    prompts[:, 0] = tokenizer.bos_token_id
    full = attribute(model, clt, prompts[0], [direction_target("fr", readout)])
    light = attribute(model, clt, prompts[0], [direction_target("fr", readout)], targets_only=True)
    torch.testing.assert_close(light.adjacency[light.target_start :], full.adjacency[full.target_start :])
    scores, frequency = attribution_scores(model, clt, prompts, readout)
    assert divmod(int(scores.flatten().argmax()), 8) == (last, 7)
    assert frequency[last, 7] == 1.0


def test_aligned_strategy_and_span_share_find_a_planted_diffmean_direction():
    torch.manual_seed(0)
    clt = random_clt(n_layers=3, d_model=16, n_features=8)
    means = {lang: torch.randn(3, 16) for lang in LANGS}
    directions = diffmean_directions(means, LANGS)
    # de's direction at layer 2 = mean_de − mean of the others
    torch.testing.assert_close(directions[2, 2], means["de"][2] - (means["en"][2] + means["fr"][2]) / 2)
    plant_write(clt, 2, 3, 7 * directions[2, 2])  # a last-layer feature writing exactly de's direction
    ranked = select_aligned(clt, directions, LANGS, per_lang=2)
    assert (ranked["de"][0]["layer"], ranked["de"][0]["feature"]) == (2, 3)
    assert ranked["de"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert span_share(clt, [(2, 3)], directions[2, 2], layer=2) == pytest.approx(1.0, abs=1e-6)
    assert span_share(clt, [(2, 3)], directions[2, 1], layer=1) == 0.0  # it writes nothing before layer 2
    # writes of layer-0 features accumulate: after layer 1 = decoder rows into layers 0 and 1
    writes = cumulative_writes(clt)
    from clt.export import folded_weights

    W = folded_weights(clt)["W_dec"][0]
    torch.testing.assert_close(writes[0][:, 1], W[:, 0] + W[:, 1])


def test_nonnegative_pursuit_recovers_a_planted_combination():
    torch.manual_seed(1)
    atoms = torch.randn(40, 24)
    target = 2.0 * atoms[3] + 0.5 * atoms[17] + 1.25 * atoms[30]
    chosen, weights = nonnegative_pursuit(atoms, target, k=5)
    assert dict(zip(chosen, weights.tolist())) == pytest.approx({3: 2.0, 17: 0.5, 30: 1.25}, abs=1e-4)
    # a negative combination is not reachable: the fit stays non-negative
    chosen, weights = nonnegative_pursuit(atoms, -atoms[3], k=3)
    assert (weights >= 0).all()
    # through a CLT: oracle features rebuild a direction planted as two features' writes
    clt = random_clt(n_layers=2, d_model=24, n_features=16)
    writes = cumulative_writes(clt)
    direction = 3.0 * writes[0][5, 1] + 1.0 * writes[1][9, 1]
    features, values = oracle_features(clt, direction, layer=1, k=4)
    assert dict(zip(features, values)) == pytest.approx({(0, 5): 3.0, (1, 9): 1.0}, abs=1e-3)


# --- recipes and edits ----------------------------------------------------------------------------------


def units_for(clt, d: int) -> LanguageUnits:
    strength = {
        lang: torch.full((2, clt.config.n_features), value) for lang, value in (("fr", 2.0), ("de", 3.0))
    }
    return LanguageUnits(
        feature_sets={"output": {"fr": [(0, 1), (1, 2)], "de": [(1, 7)]}},
        feature_strength=strength,
        neurons={},
        neuron_means={},
        residual_means={"fr": torch.zeros(2, d), "de": torch.ones(2, d)},
    )


def test_recipes_are_flag_combinations_with_exact_values(setup_model_clt):
    model, clt = setup_model_clt
    units = units_for(clt, model.config.n_embd)

    def summary(p):
        return [(e.layer, list(e.features), e.mode, e.value, e.where) for e in p.edits]

    arithmetic = plan("output", "fr", "de", 1.5, units, clt, RECIPES["arithmetic"], prompt_len=5)
    assert summary(arithmetic) == [
        (0, [1], "set", -3.0, Where(start=1)),
        (1, [2], "set", -3.0, Where(start=1)),
        (1, [7], "set", 4.5, Where(start=1)),
    ]
    seed = plan("output", "fr", "de", 30.0, units, clt, RECIPES["seed003"], prompt_len=5)
    assert seed.freeze_attention
    # last two layers of a 2-layer model = all; source multiplied by −30, target by +30, prompt only
    prompt = Where(positions=(1, 2, 3, 4))
    assert summary(seed) == [
        (0, [1], "scale", -30.0, prompt),
        (1, [2], "scale", -30.0, prompt),
        (1, [7], "scale", 30.0, prompt),
    ]
    last_layer_only = plan("output", "fr", "de", 2.0, units, clt, Recipe(min_layer=-1), prompt_len=5)
    assert [(e.layer, list(e.features)) for e in last_layer_only.edits] == [(1, [2]), (1, [7])]
    added = plan("output@1", "fr", "de", 2.0, units, clt, RECIPES["add"], prompt_len=5)
    assert summary(added) == [(1, [7], "add", 6.0, Where(start=1))]
    tail = plan("output", "fr", "de", 2.0, units, clt, Recipe(positions="last"), prompt_len=5)
    assert {e.where for e in tail.edits} == {Where(start=4)}
    randoms = plan("random-output", "fr", "de", 2.0, units, clt, RECIPES["set"], prompt_len=5)
    assert [e.layer for e in randoms.edits] == [0, 1, 1]
    assert not {(e.layer, e.features[0]) for e in randoms.edits} & {(0, 1), (1, 2), (1, 7)}
    assert [e.value for e in randoms.edits] == [0.0, 0.0, 6.0]  # the replaced features' values
    (residual,) = plan("diffmean@0", "fr", "de", 0.5, units, clt, prompt_len=5).edits
    assert (
        residual.layer == 0
        and residual.scale == 0.5
        and torch.equal(residual.vector, torch.ones(model.config.n_embd))
    )
    assert parse_method("clt") == ("entropy", None)
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("magic")
    with pytest.raises(ValueError, match="no 'attribution' feature sets"):
        plan("attribution", "fr", "de", 1.0, units, clt)


@pytest.fixture(scope="module")
def setup_model_clt(tiny_model_dir):
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    return model, random_clt(model.config.n_layer, model.config.n_embd)


@torch.no_grad()
def test_multiplicative_and_negative_edits_are_exact_through_decoders_and_kv_cache(setup_model_clt):
    """A feature scaled by −2 changes the MLP outputs by exactly (−2a − a) × its decoder rows, and
    generation with the KV cache sees the same logits as a full forward pass with the same edit."""
    from clt.recorder import mlp_activations

    model, clt = setup_model_clt
    ids = torch.randint(2, 500, (2, 10), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 1
    layer = 0
    mlp_in, mlp_out = mlp_activations(model, ids)
    acts = clt.encode_layer(mlp_in[:, :, layer] * clt.input_scale[layer], layer)
    feature = int((acts[:, 1:] > 0).float().sum((0, 1)).argmax())  # a feature active somewhere
    edit = FeatureEdit(layer, [feature], "scale", -2.0, Where(start=1))
    with Intervener(model, clt, [edit]):
        _, new_out = mlp_activations(model, ids)
    delta = (-3.0 * acts[:, :, feature]) * (torch.arange(10) >= 1)
    expected0 = mlp_out[:, :, 0] + delta[..., None] * clt.W_dec[0][feature, 0] / clt.output_scale[0]
    torch.testing.assert_close(new_out[:, :, 0], expected0, rtol=1e-5, atol=1e-5)
    assert delta.abs().sum() > 0
    # KV cache: greedy generation under the edit, then one full forward over the result under the edit
    with Intervener(model, clt, [edit]):
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=output.sequences).logits
    for step, step_scores in enumerate(output.scores):
        torch.testing.assert_close(step_scores, full[:, 9 + step], rtol=1e-4, atol=1e-4)


# --- frontier -------------------------------------------------------------------------------------------


def test_success_at_budget_by_hand():
    # (Δ loss, success, low, high) along strengths; the unsteered point first
    points = [(0.0, 0.1, 0.05, 0.2), (0.4, 0.3, 0.2, 0.4), (1.4, 0.8, 0.7, 0.9), (0.9, 0.5, 0.4, 0.6)]
    # budget 0.5: best is the segment (0.4 → 1.4) crossing at t = 0.1 → 0.35, or (1.4 → 0.9) never ≤ 0.5
    assert success_at_budget(points, 0.5) == pytest.approx((0.35, 0.25, 0.45))
    # budget 1.0: point (0.9, 0.5) and crossings (0.4→1.4 at t=0.6: 0.6) and (1.4→0.9 at t=0.8: 0.56)
    assert success_at_budget(points, 1.0) == pytest.approx((0.6, 0.5, 0.7))
    assert success_at_budget(points, 5.0)[0] == 0.8
    assert success_at_budget([(0.0, 0.2, 0.1, 0.3), (2.0, 0.9, 0.8, 1.0)], 0.0)[0] == 0.2
    mean, low, high = bootstrap_mean([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and 0.2 <= low <= mean <= high <= 0.6


def test_pairs_all_a_list_or_one_pair_and_a_bad_list_refused():
    from interventions.sweep import SteerConfig, steering_pairs
    from training.errors import UserError

    assert steering_pairs(SteerConfig(source="fr", target="de")) == [("fr", "de")]
    assert len(steering_pairs(SteerConfig(pairs="all", langs=["en", "fr", "de"]))) == 6
    assert steering_pairs(SteerConfig(pairs="en-fr, fr-de")) == [("en", "fr"), ("fr", "de")]
    for bad in ("en", "en-en", "en-fr,-de"):
        with pytest.raises(UserError, match="not a pair"):
            steering_pairs(SteerConfig(pairs=bad))


def test_first_token_frontier_by_hand_and_in_the_summary():
    from interventions.sweep import summarize, summary_markdown

    def record(method, strength, loss, fluent, first):
        return {
            "source": "en", "target": "fr", "decoding": "greedy", "method": method, "strength": strength,
            "continuation_loss": loss, "fluent_success": fluent, "fluent_success_ci": [fluent, fluent],
            "success": fluent, "distinct": 0.5, "retention": 0.5, "unknown": 0.0, "prompt_kl": 0.0,
            "first_token_target": first, "first_token_source": 1 - first,
        }  # fmt: skip

    # unsteered loss 2.0; path Δ loss 0 → 0.5 → 1.5: at Δ ≤ 1 the segment is crossed half-way
    records = [
        record("none", 0, 2.0, 0.0, 0.1),
        record("output", 1, 2.5, 0.1, 0.5),
        record("output", 2, 3.5, 0.1, 0.9),
    ]
    summary = summarize(records, [("en", "fr")], ["output"], [0.5, 1.0])
    first = summary["first_token_frontier"]["greedy"]["per_pair"]["en->fr"]["output"]
    assert first["1.0"] == pytest.approx((0.7, 0.7, 0.7))  # 0.5 + (0.9 − 0.5) / 2, no interval recorded
    assert first["0.5"] == pytest.approx((0.5, 0.5, 0.5))
    assert summary["frontier"]["greedy"]["per_pair"]["en->fr"]["output"]["1.0"][0] == pytest.approx(0.1)
    assert "judged as seed 003 judged" in summary_markdown(summary, [0.5, 1.0])
    del records[1]["first_token_target"]  # an older record: no first-token table
    assert "first_token_frontier" not in summarize(records, [("en", "fr")], ["output"], [0.5, 1.0])
