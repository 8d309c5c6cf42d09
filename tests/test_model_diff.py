"""Model diffing: each measure against a reference or a hand-made case, the diff of a model with
itself, and the whole report (script) on the tiny model and a perturbed copy."""

from __future__ import annotations

import json
import math
import subprocess

import networkx as nx
import pytest
import torch

from analysis import model_diff as diff
from analysis.language_features import feature_activation_probability
from clt.export import save_native
from clt.loss import fraction_of_variance_unexplained
from clt.recorder import MLPActivationRecorder
from tests.conftest import PYTHON, REPO, script_env
from tests.helpers import random_clt
from training.fingerprint import model_fingerprint


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=24, seed=3)
    generator = torch.Generator().manual_seed(0)
    blocks = {
        lang: torch.cat(
            [
                torch.full((6, 1), tokenizer.bos_token_id),
                torch.randint(3, len(tokenizer), (6, 11), generator=generator),
            ],
            1,
        )
        for lang in ("en", "fr", "de")
    }
    return model, tokenizer, clt, blocks


def test_clt_statistics_match_reference_implementations(tiny):
    model, _, clt, blocks = tiny
    stats = diff.clt_statistics(
        model, clt, blocks, batch_size=4
    )  # batches of 4 over 6 blocks: the sums must add up
    torch.testing.assert_close(stats["frequency"], feature_activation_probability(model, clt, blocks))
    for lang, lang_blocks in blocks.items():
        with MLPActivationRecorder(model) as recorder, torch.no_grad():
            model.transformer(input_ids=lang_blocks)
        L = clt.config.n_layers
        x = (
            torch.stack([recorder.inputs[layer][:, 1:] for layer in range(L)], 2).flatten(0, 1)
            * clt.input_scale[None, :, None]
        )
        y = (
            torch.stack([recorder.outputs[layer][:, 1:] for layer in range(L)], 2).flatten(0, 1)
            * clt.output_scale[None, :, None]
        )
        with torch.no_grad():
            y_hat, acts, _ = clt(x)
        expected = fraction_of_variance_unexplained(y.double(), y_hat.double())
        torch.testing.assert_close(
            torch.tensor(stats["fvu"][lang], dtype=torch.float64), expected, rtol=1e-6, atol=1e-9
        )
        k = stats["langs"].index(lang)
        active = acts > 0
        mean_when_active = acts.sum(0) / active.sum(0).clamp_min(1)
        torch.testing.assert_close(stats["strength"][:, :, k], mean_when_active.float(), rtol=1e-4, atol=1e-6)
        assert stats["l0"][lang] == pytest.approx(active.sum(-1).float().mean(0).tolist(), rel=1e-5)


def test_a_model_diffed_with_itself_shows_no_change(tiny):
    model, tokenizer, clt, blocks = tiny
    stats = diff.clt_statistics(model, clt, blocks)
    identity = diff.identity_features(stats["frequency"], stats["langs"], per_layer=3)
    for lang, by_layer in diff.brightening(stats, stats, identity).items():
        for entry in by_layer.values():
            assert entry["frequency_log2_ratio"] == 0.0 and entry["strength_log2_ratio"] == pytest.approx(
                0.0, abs=1e-6
            )
            assert entry["mass_log2_ratio"] == pytest.approx(0.0, abs=1e-6)
    for values in diff.lens_kl(model, model, blocks).values():
        assert max(abs(v) for v in values) < 1e-6


def test_lens_kl_at_the_last_layer_is_the_output_kl(tiny):
    model, _, _, blocks = tiny
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        # a direction, not a constant: ln_f subtracts the mean, so a constant bias shift changes nothing
        shift = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
        other.transformer.h[-1].mlp.c_proj.bias.add_(0.3 * shift)
        log_p = torch.log_softmax(model(input_ids=blocks["en"]).logits[:, 1:].double(), -1)
        log_q = torch.log_softmax(other(input_ids=blocks["en"]).logits[:, 1:].double(), -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert expected > 1e-3  # the edit is visible at the output
    kl = diff.lens_kl(model, other, {"en": blocks["en"]})["en"]
    assert kl[-1] == pytest.approx(expected, rel=1e-4)
    assert kl[0] == pytest.approx(
        0.0, abs=1e-6
    )  # the edit is in the last block: earlier residuals are identical


def test_identity_features_by_hand():
    frequency = torch.zeros(2, 4, 3)
    frequency[0, 1] = torch.tensor([0.5, 0.1, 0.0])  # en-specific (0.4)
    frequency[0, 2] = torch.tensor([0.3, 0.29, 0.0])  # barely en (0.01)
    frequency[0, 3] = torch.tensor([0.0, 0.0, 0.2])  # de-specific
    frequency[1, 0] = torch.tensor([0.2, 0.2, 0.2])  # shared: nobody's
    features = diff.identity_features(frequency, ["en", "fr", "de"], per_layer=2)
    assert features["en"][0] == [1, 2] and features["de"][0] == [3] and features["fr"][0] == []
    assert features["en"][1] == [] and features["fr"][1] == []


def test_brightening_by_hand():
    shape = (1, 3, 2)  # layer, feature, lang
    before = {"langs": ["en", "eu"], "frequency": torch.full(shape, 0.1), "strength": torch.full(shape, 2.0)}
    after = {"langs": ["en", "eu"], "frequency": torch.full(shape, 0.1), "strength": torch.full(shape, 2.0)}
    after["frequency"][0, 1, 1] = 0.4  # feature 1 fires 4× as often on Basque, half as strongly
    after["strength"][0, 1, 1] = 1.0
    entry = diff.brightening(before, after, {"eu": {0: [1]}})["eu"]["0"]
    assert entry["frequency_log2_ratio"] == pytest.approx(2.0) and entry[
        "strength_log2_ratio"
    ] == pytest.approx(-1.0)
    assert entry["mass_log2_ratio"] == pytest.approx(1.0) and entry["mass_before"] == pytest.approx(0.2)


def hand_graph(edges: list[tuple[str, str, float]]) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in {n for u, v, _ in edges for n in (u, v)}:
        if node.startswith("F"):
            layer, feature = map(int, node[1:].split("@")[0].split("_"))
            g.add_node(node, kind="feature", layer=layer, feature=feature)
        elif node.startswith("X"):
            g.add_node(node, kind="error", layer=int(node[1:].split("@")[0]))
        elif node.startswith("E"):
            g.add_node(node, kind="token", layer=-1)
        else:
            g.add_node(node, kind="target", layer=3)
    for u, v, w in edges:
        g.add_edge(u, v, weight=w)
    return g


def test_edge_change_and_cluster_strength_by_hand():
    before = hand_graph([("E5@0", "F1_7@0", 2.0), ("F1_7@0", "F2_3@1", 1.0), ("F2_3@1", "T0", 1.0)])
    after = hand_graph([("E5@0", "F1_7@0", 3.0), ("F1_7@0", "F2_9@1", 1.0), ("F2_9@1", "T0", 4.0)])
    change = diff.edge_change(before, after)
    # Target edges are left out; |3−2| + |0−1| + |1−0| over Σ|before| = 3.
    assert change["relative_change"] == pytest.approx(3 / 3) and change["edge_jaccard"] == pytest.approx(
        1 / 3
    )
    assert diff.cluster_strength(before, {(1, 7)}) == pytest.approx(1.0 / 4.0)
    with_error = hand_graph([("E5@0", "X1@0", 1.0), ("X1@0", "F2_3@1", 3.0)])
    assert diff.error_share(with_error) == pytest.approx(3.0 / 4.0) and diff.error_share(before) == 0.0
    assert diff.cluster_strength(after, {(1, 7), (2, 9)}) == pytest.approx(5.0 / 8.0)
    strength = diff.edge_strength_by_layer(before, n_layers=3)
    assert strength[0, 1] == 2.0 and strength[2, 2] == 1.0 and strength[3, 3] == 1.0 and strength.sum() == 4.0
    graphs = {"before": {"en": [before], "fr": [before]}, "after": {"en": [after], "fr": [before]}}
    result = diff.graph_differences(graphs, n_layers=4)
    assert result["middle_layers"] == [1, 2]
    assert result["per_lang"]["fr"]["edge_relative_change"] == 0.0
    assert result["per_lang"]["fr"]["middle_cluster_strength_before"] == pytest.approx(2.0 / 4.0)


def test_model_diff_script_end_to_end(tmp_path, tiny, tiny_model_dir, real_slice_corpus_dir):
    model, tokenizer, clt, _ = tiny
    clt_dir = save_native(
        clt,
        tmp_path / "clt",
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    after_dir = tmp_path / "after"
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    changed.save_pretrained(after_dir)
    tokenizer.save_pretrained(after_dir)
    out = tmp_path / "diff"
    command = [
        PYTHON,
        str(REPO / "scripts" / "model_diff.py"),
        "--before",
        str(tiny_model_dir),
        "--after",
        str(after_dir),
        "--clt",
        str(clt_dir),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--langs",
        "en,fr,de",
        "--focus-lang",
        "fr",
        "--n-ctx",
        "16",
        "--blocks-per-lang",
        "4",
        "--graph-prompts",
        "2",
        "--graph-tokens",
        "6",
        "--run-dir",
        str(out),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["clt_trained_on"] == {"before": True, "after": False}
    # Layer 0 is untouched: its lens KL is 0 and the CLT reconstructs it equally well on both models.
    for lang in ("en", "fr", "de"):
        assert (
            report["lens_kl"][lang][0] == pytest.approx(0.0, abs=1e-6) and report["lens_kl"][lang][1] > 1e-6
        )
        assert report["clt_fvu"]["after"][lang][0] == pytest.approx(
            report["clt_fvu"]["before"][lang][0], rel=1e-5
        )
    assert report["graphs"]["n_prompts"] == 2 and set(report["graphs"]["per_lang"]) == {"en", "fr", "de"}
    assert {f["claim"].split(" ")[0] for f in report["findings"]} >= {"fine-tuning", "the"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 3 and "Findings" in page
    # Refusals: a CLT trained on neither model, and mismatched tokenizers are caught early.
    other_clt = save_native(clt, tmp_path / "clt-other", {"model_sha256": "0" * 64})
    refused = subprocess.run(
        command[:-2] + ["--clt", str(other_clt), "--run-dir", str(tmp_path / "x")],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "trained on neither model" in refused.stderr


def test_feature_drift_by_hand(tiny):
    """A CLT against itself: every cosine 1, nothing turned; one feature's decoder negated: its layer's
    turned share is 1 / F and the identity feature's cosine −1."""
    from analysis.model_diff import feature_drift

    _, _, clt, _ = tiny
    same = feature_drift(clt, clt, {"fr": {0: [3]}})
    assert all(
        layer["decoder_cosine"] == pytest.approx(1.0) and layer["turned_share"] == 0
        for layer in same["per_layer"]
    )
    warm = random_clt(clt.config.n_layers, clt.config.d_model, n_features=24, seed=3)
    with torch.no_grad():
        warm.load_state_dict(clt.state_dict())
        warm.W_dec[0][3].neg_()
    drift = feature_drift(clt, warm, {"fr": {0: [3]}})
    assert drift["per_layer"][0]["turned_share"] == pytest.approx(1 / 24)
    assert drift["identity_decoder_cosine"]["fr"] == pytest.approx(-1.0)


def test_model_diff_with_warm_clt_and_crosscoder(tmp_path, tiny, tiny_model_dir, real_slice_corpus_dir):
    """The two field methods through model_diff.py: --method warm-clt (a CLT continued on the after model,
    here a copy with one decoder turned) and --method crosscoder (a hand-made crosscoder on the last MLP
    output whose latent 0 exists only in the after model)."""
    from clt.crosscoder import Crosscoder, CrosscoderConfig
    from clt.crosscoder_train import save_crosscoder

    model, tokenizer, clt, _ = tiny
    meta = {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)}
    clt_dir = save_native(clt, tmp_path / "clt", meta)
    warm = random_clt(clt.config.n_layers, clt.config.d_model, n_features=24, seed=3)
    with torch.no_grad():
        warm.load_state_dict(clt.state_dict())
        warm.W_dec[1][5].mul_(-1)
    warm_dir = save_native(warm, tmp_path / "warm", meta)
    base = [
        PYTHON,
        str(REPO / "scripts" / "model_diff.py"),
        "--before",
        str(tiny_model_dir),
        "--after",
        str(tiny_model_dir),
        "--clt",
        str(clt_dir),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--langs",
        "en,fr,de",
        "--focus-lang",
        "fr",
        "--n-ctx",
        "16",
        "--blocks-per-lang",
        "4",
        "--graph-prompts",
        "0",
    ]
    result = subprocess.run(
        base + ["--method", "warm-clt", "--warm-clt", str(warm_dir), "--run-dir", str(tmp_path / "w")],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["feature_drift"]["per_layer"][1]["turned_share"] == pytest.approx(1 / 24)
    assert report["feature_drift"]["per_layer"][0]["turned_share"] == 0

    d = model.config.n_embd
    crosscoder = Crosscoder(
        CrosscoderConfig(n_features=4, activation="relu", n_models=2, n_sites=1, d_model=d)
    )
    with torch.no_grad():
        crosscoder.W_enc.zero_()
        crosscoder.W_enc[1, :, 0] = torch.ones(d) / d  # latent 0 reads the after model only
        crosscoder.W_enc[:, :, 1] = torch.ones(d) / d  # latent 1 reads both
        crosscoder.b_enc.fill_(1.0)
        crosscoder.W_dec.zero_()
        crosscoder.W_dec[0, 1] = torch.ones(d)  # latent 0 decodes into the after model only
        crosscoder.W_dec[1, 0] = crosscoder.W_dec[1, 1] = torch.ones(d)
    save_crosscoder(
        crosscoder, tmp_path / "cc", {"model_a": "a", "model_b": "b", "site": "mlp_out", "layers": [1]}
    )
    result = subprocess.run(
        base
        + ["--method", "crosscoder", "--crosscoder", str(tmp_path / "cc"), "--run-dir", str(tmp_path / "c")],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["latent_counts"]["b_only"] == 1 and report["latent_counts"]["shared"] == 1
    assert [d["latent"] for d in report["after_only"]] == [0]
    causal = report["causal"][0]
    assert (
        causal["latent"] == 0
        and causal["control_latent"] == 1
        and set(causal["delta_loss_latent"]) == {"en", "fr", "de"}
    )
    assert "relative_norms.png" in (tmp_path / "c" / "report.md").read_text()
    (layer,) = report["layer_brightening"]  # latent 1 decodes alike into both models at layer 1
    assert layer["layer"] == 1 and "Decoder change per layer" in (tmp_path / "c" / "report.md").read_text()


def test_leaning_test_tells_a_tilted_set_from_a_random_one():
    from analysis.crosscoder_diff import leaning_test

    relative = torch.linspace(0.2, 0.8, 200)  # live latents' relative decoder norms
    tilted = leaning_test(relative, relative[-20:])  # the 20 most after-leaning
    assert tilted["observed"] > tilted["null_high"] and tilted["p_at_least"] == 0.0
    assert tilted["null_mean"] == pytest.approx(0.5, abs=0.01)  # the null is centred on the live mean
    plain = leaning_test(relative, relative[::10])  # an even spread: no lean
    assert plain["null_low"] < plain["observed"] < plain["null_high"] and 0.2 < plain["p_at_least"] < 0.8
    assert math.isnan(leaning_test(relative, relative[:0])["observed"])
