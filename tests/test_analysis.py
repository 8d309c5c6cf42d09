"""Locating language: each metric on hand-built cases with known answers, and the report end to end."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from analysis import lape, probes, similarity
from analysis.ablation import SkipLayers, ablation_settings, scored_loss
from analysis.language_features import entropy_bits, language_features
from analysis.lens import lens_language_probabilities, lens_report
from analysis.located import load_located, save_located, validate_located
from analysis.residuals import lens_logits, residual_stream
from analysis.token_language import language_table, token_counts
from tests.conftest import PYTHON, REPO, script_env
from training.selection import random_matched


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


def random_blocks(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    blocks = torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    blocks[:, 0] = 1  # BOS
    return blocks


def test_token_language_table():
    counts = torch.tensor([[10.0, 0.0], [5.0, 5.0], [0.0, 0.0], [85.0, 5.0]])  # en has 100 tokens, fr 10
    table = language_table(counts, smoothing=0.0 + 1e-9)
    assert table[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)  # only ever seen in en
    # token 1: 5% of en's tokens, 50% of fr's: per-language normalisation makes it mostly fr
    assert table[1, 1] == pytest.approx(0.5 / 0.55, rel=1e-4)
    assert table[2].tolist() == pytest.approx([0.5, 0.5])  # never seen: uniform
    assert torch.allclose(table.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="no tokens"):
        language_table(torch.tensor([[1.0, 0.0]]))


def test_token_counts_count_tokens(tiny):
    _, tokenizer = tiny
    counts = token_counts(tokenizer, {"en": ["OK OK"], "fr": ["oui"]})
    ids = tokenizer("OK OK", add_special_tokens=False)["input_ids"]
    assert counts[:, 0].sum() == len(ids)
    assert counts[ids[0], 0] >= 1


def test_last_layer_lens_is_the_model_output(tiny):
    model, _ = tiny
    ids = random_blocks(3, 12, 512, seed=0)
    hidden = residual_stream(model, ids)
    assert hidden.shape == (model.config.n_layer, 3, 12, model.config.n_embd)
    torch.testing.assert_close(lens_logits(model, hidden[-1]), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_soft_lens_with_a_one_hot_table(tiny):
    """With every token assigned to exactly one language, P(lang) is the lens's probability mass on that
    language's tokens and sums to 1 over languages."""
    model, tokenizer = tiny
    vocab = model.config.vocab_size
    table = torch.zeros(vocab, 2)
    table[: vocab // 2, 0] = 1
    table[vocab // 2 :, 1] = 1
    ids = random_blocks(4, 10, 512, seed=1)
    probs, strings = lens_language_probabilities(model, ids, table, tokenizer)
    assert probs.shape == (4, model.config.n_layer, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, model.config.n_layer))
    final = model(ids).logits[:, 1:].softmax(-1)[..., : vocab // 2].sum(-1).mean(1)
    torch.testing.assert_close(probs[:, -1, 0], final, rtol=1e-4, atol=1e-5)
    assert len(strings) == 4 and len(strings[0]) == model.config.n_layer


def test_lens_report_finds_where_the_language_leads():
    # 2 layers × 2 languages; fr prompts: en leads at layer 0, fr from layer 1; en prompts: en throughout
    probs = torch.tensor([[[0.7, 0.3], [0.8, 0.2]], [[0.6, 0.4], [0.3, 0.7]]])
    report = lens_report(probs, [], ["en", "fr"], ["en", "fr"])
    assert report["by_prompt_lang"]["en"]["own_language_leads_from_layer"] == 0
    assert report["by_prompt_lang"]["fr"]["own_language_leads_from_layer"] == 1
    assert report["by_prompt_lang"]["fr"]["leader_per_layer"] == ["en", "fr"]
    never = lens_report(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]), [], ["fr"], ["en", "fr"])
    assert never["by_prompt_lang"]["fr"]["own_language_leads_from_layer"] is None


def test_identical_parallel_inputs_have_similarity_one(tiny):
    model, tokenizer = tiny
    texts = ["Click OK to close", "Select the text", "Open the dialog box"]
    states = similarity.pooled_states(model, tokenizer, texts)
    result = similarity.pair_similarities(states, states)
    assert result["parallel"] == pytest.approx([1.0] * model.config.n_layer, abs=1e-5)
    assert all(g > 0 for g in result["gap"])
    report = similarity.similarity_report({"en": states, "xx": states.clone()})
    assert report["mean"]["centred"]["parallel"] == pytest.approx([1.0] * model.config.n_layer, abs=1e-5)
    # padding does not leak: a text pooled alone equals the same text pooled in a batch of longer ones
    alone = similarity.pooled_states(model, tokenizer, texts[:1])
    torch.testing.assert_close(alone[:, 0], states[:, 0], rtol=1e-4, atol=1e-5)


def test_non_parallel_pairs_need_two_paragraphs():
    with pytest.raises(ValueError, match="two"):
        similarity.pair_similarities(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))


def test_skipping_zero_layers_changes_nothing_and_hooks_are_removed(tiny):
    model, _ = tiny
    ids = random_blocks(2, 10, 512, seed=2)
    reference = model(ids).logits
    with SkipLayers(model, []):
        torch.testing.assert_close(model(ids).logits, reference)
    with SkipLayers(model, range(model.config.n_layer)):
        skipped = model(ids).logits
        embeddings = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(10))
        torch.testing.assert_close(skipped, lens_logits(model, embeddings), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, reference)  # hooks gone
    assert [s["k"] for s in ablation_settings(4)] == [0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        SkipLayers(model, [model.config.n_layer])


def test_scored_loss_matches_the_model_loss(tiny):
    model, _ = tiny
    ids = random_blocks(3, 9, 512, seed=3)
    expected = model(input_ids=ids, labels=ids).loss.item()
    assert scored_loss(model, [row.tolist() for row in ids], [1, 1, 1]) == pytest.approx(expected, rel=1e-5)
    # scoring only the tail of a sequence differs (ragged lengths are padded, not scored)
    tail = scored_loss(model, [ids[0].tolist(), ids[1, :5].tolist()], [5, 2])
    assert math.isfinite(tail)


def test_lape_entropy_and_selection():
    # 1 layer, 4 units, 3 languages
    p = torch.tensor(
        [
            [
                [0.9, 0.0, 0.0],  # only en: entropy 0, selected for en
                [0.5, 0.5, 0.5],  # every language: maximal entropy
                [0.0, 0.8, 0.85],  # fr + de
                [0.01, 0.0, 0.0],
            ]
        ]
    )  # only en but rare: below the percentile, not a candidate
    h = lape.entropy(p)
    assert h[0, 0] == pytest.approx(0.0) and h[0, 1] == pytest.approx(math.log(3))
    selection = lape.lape_select(p, ["en", "fr", "de"], top_fraction=0.5, percentile=0.75)
    assert selection["selected"] == [(0, 0), (0, 2)]
    assert selection["by_lang"]["en"] == [(0, 0)] and selection["by_lang"]["de"] == [(0, 2)]
    assert entropy_bits(torch.tensor([[0.2, 0.2, 0.0, 0.0]])).item() == pytest.approx(1.0)


def test_deactivating_neurons_zeroes_exactly_them(tiny):
    model, _ = tiny
    ids = random_blocks(2, 8, 512, seed=4)
    seen = {}
    handle = model.transformer.h[1].mlp.act.register_forward_hook(
        lambda m, a, out: seen.__setitem__("act", out.clone())
    )
    reference_logits = model(ids).logits
    reference = seen["act"]
    handle.remove()
    captured = {}
    with lape.deactivate_neurons(model, [(1, 3), (1, 7)]):  # hooks run in order: h2 sees the zeroed output
        h2 = model.transformer.h[1].mlp.act.register_forward_hook(
            lambda m, a, out: captured.__setitem__("act", out.clone())
        )
        changed_logits = model(ids).logits
        h2.remove()
    assert (captured["act"][..., [3, 7]] == 0).all()
    keep = [i for i in range(reference.shape[-1]) if i not in (3, 7)]
    torch.testing.assert_close(captured["act"][..., keep], reference[..., keep])
    assert not torch.allclose(changed_logits, reference_logits)
    torch.testing.assert_close(model(ids).logits, reference_logits)  # removed cleanly
    with pytest.raises(ValueError, match="do not exist"):
        lape.deactivate_neurons(model, [(0, 10**6)])
    matched = random_matched([(0, 1), (0, 2), (1, 5)], n_units=128, seed=0, exclude={(0, 1), (0, 2), (1, 5)})
    assert sorted(l for l, _ in matched) == [0, 0, 1] and not {(0, 1), (0, 2), (1, 5)} & set(matched)


def test_neuron_activation_probability_counts_positive_activations(tiny):
    model, _ = tiny
    blocks = {"en": random_blocks(3, 8, 512, seed=5), "fr": random_blocks(2, 8, 512, seed=6)}
    probs = lape.neuron_activation_probability(model, blocks)
    acts = {}
    handle = model.transformer.h[0].mlp.act.register_forward_hook(
        lambda m, a, out: acts.__setitem__("a", out)
    )
    model.transformer(input_ids=blocks["fr"])
    handle.remove()
    expected = (acts["a"][:, 1:] > 0).float().mean((0, 1))
    torch.testing.assert_close(probs[0, :, 1], expected)


def test_language_feature_catalogue():
    p = torch.zeros(2, 4, 3)
    p[1, 0] = torch.tensor([0.0, 0.5, 0.0])  # only fr, frequent, late layer → catalogued for fr
    p[0, 1] = torch.tensor([0.3, 0.3, 0.3])  # everywhere: log2(3) bits → not a language feature
    p[1, 2] = torch.tensor([0.0, 0.0, 0.005])  # only de but rarer than min_frequency
    p[0, 3] = torch.tensor([0.2, 0.01, 0.0])  # mostly en: ~0.28 bits, catalogued for en
    catalogue = language_features(p, ["en", "fr", "de"], max_entropy_bits=0.8, min_frequency=0.01)
    assert [(f["layer"], f["feature"]) for f in catalogue["fr"]] == [(1, 0)]
    assert catalogue["fr"][0]["entropy_bits"] == pytest.approx(0.0)
    assert [(f["layer"], f["feature"]) for f in catalogue["en"]] == [(0, 3)]
    assert catalogue["de"] == []


def test_probe_accuracy_on_separable_and_random_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    result = probes.fit_probe(x[:300], y[:300], x[300:], y[300:], n_classes=2)
    assert result["test_accuracy"] > 0.95
    noise = torch.randint(0, 2, (400,), generator=generator)
    chance = probes.fit_probe(x[:300], noise[:300], x[300:], noise[300:], n_classes=2)
    assert chance["test_accuracy"] < 0.7
    with pytest.raises(ValueError, match="NaN"):
        probes.fit_probe(torch.full((4, 2), float("nan")), y[:4], x[:2, :2], y[:2], 2)


def test_located_file_contract(tmp_path, tiny):
    model, _ = tiny
    doc = {
        "model_dir": "m",
        "model_sha256": None,
        "clt_dir": None,
        "langs": ["en", "fr"],
        "n_layers": 2,
        "layers": {"decision": {"en": 0, "fr": 1}},
        "neurons": {"en": [[0, 5]], "fr": [[1, 7]]},
        "neurons_5pct": {},
        "features": {"fr": [[1, 3]]},
        "feature_aligned_neurons": {},
    }
    path = save_located(tmp_path / "located.json", doc)
    loaded = load_located(path, model=model)
    assert loaded["neurons"]["fr"] == [[1, 7]] and loaded["format"] == "multilingual-clt/located-units"
    bad = dict(loaded, neurons={"en": [[5, 0]]})
    with pytest.raises(ValueError, match="layer"):
        validate_located(bad)
    with pytest.raises(ValueError, match="not in langs"):
        validate_located(dict(loaded, features={"ja": []}))
    with pytest.raises(ValueError, match="outside"):
        validate_located(dict(loaded, neurons={"en": [[0, 10**6]]}), model=model)
    with pytest.raises(ValueError, match="not a located-units"):
        validate_located({"format": "x"})
    # version 1 (before feature sets) still loads: its features become the entropy set
    old = json.loads(path.read_text())
    old["version"] = 1
    old.pop("feature_sets")
    (tmp_path / "v1.json").write_text(json.dumps(old))
    upgraded = load_located(tmp_path / "v1.json", model=model)
    assert upgraded["feature_sets"] == {"entropy": {"fr": [[1, 3]]}}
    with pytest.raises(ValueError, match="feature_sets.output"):
        validate_located(dict(loaded, feature_sets={"output": {"fr": [[9, 0]]}}))


def test_locate_language_report_on_a_tiny_model(tiny_model_dir, real_slice_corpus_dir, tmp_path):
    from clt.export import save_native
    from tests.helpers import random_clt
    from training.fingerprint import model_fingerprint

    clt = random_clt(2, 32, n_features=24)
    clt_dir = save_native(
        clt,
        tmp_path / "clt",
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    run_dir = tmp_path / "locate"
    command = [
        PYTHON,
        str(REPO / "scripts" / "locate_language.py"),
        "--model-dir",
        str(tiny_model_dir),
        "--clt",
        str(clt_dir),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--langs",
        "en,fr,de",
        "--run-dir",
        str(run_dir),
        "--n-ctx",
        "16",
        "--blocks-per-lang",
        "6",
        "--train-texts-per-lang",
        "60",
        "--n-parallel",
        "8",
        "--prompts-per-lang",
        "3",
        "--prompt-tokens",
        "6",
        "--new-tokens",
        "4",
        "--min-frequency",
        "0.0",
        "--max-entropy-bits",
        "1.6",
        "--token-min-count",
        "1",
        "--token-min-share",
        "0.6",
        "--attribution-prompts",
        "4",
        "--linguamap-items",
        "10",
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert {"lens", "similarity", "ablation", "lape", "features", "feature_sets", "probes"} <= set(
        report["sections"]
    )
    assert len(report["findings"]) >= 5
    sim = report["sections"]["similarity"]
    assert len(sim["mean"]["centred"]["gap"]) == 2 and sim["n_paragraphs"] == 8
    ablation_rows = report["sections"]["ablation"]["settings"]
    assert [r["side"] for r in ablation_rows] == ["none", "input", "output"]
    located = load_located(run_dir / "located.json", model_dir=tiny_model_dir)
    assert set(located["neurons"]) == {"en", "fr", "de"}
    assert located["version"] == 2
    assert set(located["feature_sets"]) == {"entropy", "output", "attribution", "aligned"}
    sets = report["sections"]["feature_sets"]["sets"]
    for strategy, ranked in sets.items():  # inspectable: layer, frequency per language, contexts, promotes
        assert located["feature_sets"][strategy] == {
            l: [[f["layer"], f["feature"]] for f in items] for l, items in ranked.items()
        }
        for f in [f for items in ranked.values() for f in items]:
            assert set(f["frequency_by_lang"]) == {"en", "fr", "de"} and len(f["promotes"]) == 8
    assert sum(len(items) for items in sets["output"].values()) > 0
    markdown = (run_dir / "report.md").read_text()
    assert "Feature set: output" in markdown and "Feature set: attribution" in markdown
    assert '<img src="data:image/png;base64,' in (run_dir / "report.html").read_text()
    # a re-run reuses every finished section
    again = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reused") == 8
    # the CLT retrained in place (same path, same config): reusing its sections would be stale — refused
    save_native(
        random_clt(2, 32, n_features=24, seed=1),
        clt_dir,
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    stale = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert stale.returncode == 2 and "reused" not in stale.stdout
    assert stale.stderr.count("\n") == 1 and "computed from another clt" in stale.stderr
