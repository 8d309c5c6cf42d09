"""Interventions change exactly what they claim, compose, work under the KV cache, and leave no trace."""

from __future__ import annotations

import pytest
import torch

from interventions.hooks import (
    FeatureEdit,
    Intervener,
    NeuronEdit,
    ResidualAdd,
    Where,
    freeze_attention,
    record_patterns,
)
from tests.helpers import random_clt


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    clt = random_clt(model.config.n_layer, model.config.n_embd)
    ids = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    return model, clt, ids


def mlp_io(model, ids):
    from clt.recorder import mlp_activations

    return mlp_activations(model, ids)


@torch.no_grad()
def test_feature_clamp_is_seen_and_written_through_the_decoders(setup):
    model, clt, ids = setup
    layer, feature = 0, 5
    mlp_in, mlp_out = mlp_io(model, ids)
    clean = clt.encode_layer(mlp_in[:, :, layer] * clt.input_scale[layer], layer)
    where = Where(positions=(3, 7))
    with Intervener(model, clt, [FeatureEdit(layer, [feature], "set", 2.5, where)]) as intervener:
        new_in, new_out = mlp_io(model, ids)
    seen = intervener.feature_values[(layer, feature)]
    assert torch.all(seen[:, [3, 7]] == 2.5)
    others = [p for p in range(ids.shape[1]) if p not in (3, 7)]
    torch.testing.assert_close(seen[:, others], clean[:, others, feature])
    # the same layer's input is upstream of the edit: every feature there reads the clean value
    torch.testing.assert_close(new_in[:, :, layer], mlp_in[:, :, layer])
    # layer 0's MLP output moved by exactly Δa · W_dec^{0→0} / s_out, only at the edited positions
    delta = 2.5 - clean[:, :, feature]
    expected = mlp_out[:, :, layer].clone()
    expected[:, [3, 7]] += delta[:, [3, 7], None] * clt.W_dec[layer][feature, 0] / clt.output_scale[layer]
    torch.testing.assert_close(new_out[:, :, layer], expected, rtol=1e-5, atol=1e-6)
    # positions before the first edit are untouched everywhere (causality)
    torch.testing.assert_close(new_out[:, :3], mlp_out[:, :3])


@torch.no_grad()
def test_cross_layer_decoders_reach_later_layers_with_attention_frozen(setup):
    """With attention patterns frozen, a clamp at layer 0 changes layer 1's MLP *input* at the edited
    position by exactly what the layer-0→1 decoder writes plus the layer-0→0 decoder's effect on the
    residual (both enter the residual before layer 1), and leaves other positions' layer-1 inputs
    unchanged except through attention values."""
    model, clt, ids = setup
    patterns = record_patterns(model, ids)
    with freeze_attention(model, patterns):
        clean_in, clean_out = mlp_io(model, ids)
    reference_in, reference_out = mlp_io(model, ids)
    torch.testing.assert_close(
        clean_out, reference_out, rtol=1e-5, atol=1e-5
    )  # replaying patterns = the model
    with (
        freeze_attention(model, patterns),
        Intervener(model, clt, [FeatureEdit(0, [5], "add", 1.0, Where(positions=(4,)))]),
    ):
        new_in, new_out = mlp_io(model, ids)
    # layer 1's MLP output moved by the 0→1 decoder (plus whatever layer 1's own MLP does with its new input)
    assert not torch.allclose(new_out[:, 4, 1], clean_out[:, 4, 1])
    torch.testing.assert_close(new_in[:, :4], clean_in[:, :4])


def test_interventions_are_removed_cleanly(setup):
    model, clt, ids = setup
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad():
        reference = model(ids).logits
        with Intervener(
            model,
            clt,
            [
                FeatureEdit(1, [1, 2], "scale", 3.0),
                NeuronEdit(0, [4], "set", 0.0),
                ResidualAdd(1, torch.ones(model.config.n_embd)),
            ],
        ):
            changed = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(changed, reference)
    torch.testing.assert_close(after, reference)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    for block in model.transformer.h:
        assert not block._forward_hooks and not block.mlp._forward_hooks and not block.mlp.act._forward_hooks
    assert not model.transformer._forward_pre_hooks


@torch.no_grad()
def test_neuron_edits_compose_in_order(setup):
    model, _, ids = setup
    seen = {}
    edits = [
        NeuronEdit(0, [3], "set", 2.0),
        NeuronEdit(0, [3], "scale", 3.0),
        NeuronEdit(0, [9], "add", 1.0, Where(start=5)),
    ]
    clean = {}
    h = model.transformer.h[0].mlp.act.register_forward_hook(
        lambda m, a, o: clean.__setitem__("a", o.clone())
    )
    model(ids)
    h.remove()
    with Intervener(model, None, edits):
        h = model.transformer.h[0].mlp.act.register_forward_hook(
            lambda m, a, o: seen.__setitem__("a", o.clone())
        )
        model(ids)
        h.remove()
    assert torch.all(seen["a"][..., 3] == 6.0)  # set then scale
    torch.testing.assert_close(seen["a"][:, 5:, 9], clean["a"][:, 5:, 9] + 1.0)
    torch.testing.assert_close(seen["a"][:, :5, 9], clean["a"][:, :5, 9])


@torch.no_grad()
def test_generation_with_kv_cache_matches_full_recomputation(setup):
    """An open-ended edit (every position from 6 on) gives the same greedy continuation with the KV cache
    as recomputing the whole sequence at every step without it: positions are tracked across steps."""
    model, clt, ids = setup
    prompt = ids[:1, :8]
    edits = [
        FeatureEdit(1, [3], "set", 4.0, Where(start=6)),
        ResidualAdd(
            0,
            torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1)),
            2.0,
            Where(start=9),
        ),
    ]
    with Intervener(model, clt, edits):
        cached = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        sequence = prompt
        for _ in range(6):
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, sequence)
    plain = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert not torch.equal(plain, cached)


def test_bad_edits_fail_early(setup):
    model, clt, _ = setup
    with pytest.raises(ValueError, match="layers"):
        Intervener(model, clt, [FeatureEdit(9, [0])])
    with pytest.raises(ValueError, match="needs the CLT"):
        Intervener(model, None, [FeatureEdit(0, [0])])
    with pytest.raises(ValueError, match="do not exist"):
        Intervener(model, clt, [FeatureEdit(0, [10**6])])
    with pytest.raises(ValueError, match="mode"):
        Intervener(model, clt, [NeuronEdit(0, [0], "multiply")])
    with pytest.raises(ValueError, match="shape"):
        Intervener(model, clt, [ResidualAdd(0, torch.zeros(3))])


def test_wilson_interval_and_judging():
    from interventions.steering import judge, wilson_interval

    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    texts = [
        "Die Datei wird in dem ausgewählten Ordner gespeichert, wenn Sie auf die Schaltfläche klicken.",
        "Le fichier est enregistré dans le dossier sélectionné lorsque vous cliquez sur le bouton.",
        "Die Tabelle enthält alle Daten, die Sie zuvor in das Dokument eingefügt haben.",
        "123 456",
    ]
    result = judge(texts, source="fr", target="de", distinct=[1.0, 1.0, 0.2, 1.0])
    assert (
        result["success"] == 0.5
        and result["retention"] == 0.25
        and result["unknown"] == 0.25
        and result["n"] == 4
    )
    assert result["fluent_success"] == 0.25  # the second German text counts as degenerate here


@torch.no_grad()
def test_steering_evaluation_on_a_tiny_model(setup, tiny_model_dir):
    """No edits: zero prompt KL and the continuation loss equals the model's own loss on its continuation;
    a plan's edits change the continuations; the random control picks other features of the same layers."""
    from transformers import AutoTokenizer

    from interventions.steering import LanguageUnits, evaluate, plan, random_matched_features

    model, clt, ids = setup
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ids[:, :8]
    clean = evaluate(model, tokenizer, clt, [], prompts, "fr", "de", new_tokens=5)
    assert clean["prompt_kl"] == pytest.approx(0.0, abs=1e-7) and clean["n"] == 2
    assert 0 < clean["distinct"] <= 1 and clean["fluent_success"] <= clean["success"]
    output = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    expected = model(
        input_ids=output, labels=torch.cat([torch.full_like(prompts, -100), output[:, 8:]], 1)
    ).loss
    assert clean["continuation_loss"] == pytest.approx(float(expected), rel=1e-4)

    d = model.config.n_embd
    units = LanguageUnits(
        feature_sets={"entropy": {"fr": [(0, 1), (1, 2)], "de": [(1, 7)]}},
        feature_strength={
            "fr": torch.ones(2, clt.config.n_features),
            "de": torch.full((2, clt.config.n_features), 3.0),
        },
        neurons={"fr": [(0, 3)], "de": [(1, 4)]},
        neuron_means={(0, 3): 0.5, (1, 4): 0.7},
        residual_means={"fr": torch.zeros(2, d), "de": torch.ones(2, d)},
    )
    edits = plan("clt", "fr", "de", 4.0, units, clt, prompt_len=8).edits
    assert [(e.layer, list(e.features), e.value) for e in edits] == [
        (0, [1], 0.0),
        (1, [2], 0.0),
        (1, [7], 12.0),
    ]
    steered = evaluate(model, tokenizer, clt, edits, prompts, "fr", "de", new_tokens=5)
    assert steered["prompt_kl"] > 0
    sampled = evaluate(
        model, tokenizer, clt, edits, prompts, "fr", "de", new_tokens=5, decoding="sampled", samples=3
    )
    assert sampled["n"] == 6 and sampled["decoding"] == "sampled"
    again = evaluate(
        model, tokenizer, clt, edits, prompts, "fr", "de", new_tokens=5, decoding="sampled", samples=3
    )
    assert again["examples"] == sampled["examples"]  # seeded
    lape_edits = plan("lape", "fr", "de", 2.0, units, prompt_len=8).edits
    assert [(e.layer, list(e.neurons), e.value) for e in lape_edits] == [
        (0, [3], 0.0),
        (1, [4], pytest.approx(1.4)),
    ]
    (residual,) = plan("diffmean", "fr", "de", 0.5, units, prompt_len=8).edits
    assert residual.layer == 1 and torch.equal(residual.vector, torch.ones(d))
    exclude = {(0, 1), (1, 2), (1, 7)}
    randoms = random_matched_features(clt, [(0, 1), (1, 2)], exclude, seed=0)
    assert [l for l, _ in randoms] == [0, 1] and not exclude & set(randoms)
    with pytest.raises(ValueError, match="unknown method"):
        plan("magic", "fr", "de", 1.0, units)
    # frozen prompt attention: the plan runs, and with no edits it changes nothing
    from interventions.steering import Plan

    frozen = evaluate(
        model, tokenizer, clt, Plan([], freeze_attention=True), prompts, "fr", "de", new_tokens=5
    )
    assert frozen["examples"] == clean["examples"] and frozen["prompt_kl"] == pytest.approx(0.0, abs=1e-6)

    # first-token shares: a table that gives prompt 0's first greedy token to German (p = 1) and every
    # other token to French counts exactly the prompts whose first token is that one
    first = model(input_ids=prompts).logits[:, -1].argmax(-1)
    vocab = model.config.vocab_size
    german = torch.zeros(vocab)
    german[first[0]] = 1.0
    table = {"de": german, "fr": 1.0 - german}
    shares = evaluate(model, tokenizer, clt, [], prompts, "fr", "de", new_tokens=5, token_language=table)
    expected = float((first == first[0]).float().mean())
    assert shares["first_token_target"] == pytest.approx(expected)
    assert shares["first_token_source"] == pytest.approx(1.0 - expected)
    assert "first_token_target" not in clean  # without a table nothing is claimed


def test_steer_script_runs_resumes_and_summarises(setup, tiny_model_dir, real_slice_corpus_dir, tmp_path):
    import json
    import subprocess

    from analysis.located import save_located
    from clt.export import save_native
    from tests.conftest import PYTHON, REPO, script_env
    from training.fingerprint import model_fingerprint

    model, clt, _ = setup
    clt_dir = save_native(
        clt,
        tmp_path / "clt",
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    located = save_located(
        tmp_path / "located.json",
        {
            "model_dir": str(tiny_model_dir),
            "model_sha256": model_fingerprint(tiny_model_dir),
            "clt_dir": str(clt_dir),
            "langs": ["en", "fr", "de"],
            "n_layers": 2,
            "layers": {},
            "neurons": {"fr": [[0, 3], [1, 5]], "de": [[1, 9]], "en": []},
            "neurons_5pct": {},
            "features": {"fr": [[0, 1], [1, 2]], "de": [[1, 7], [0, 4]], "en": [[0, 0]]},
            "feature_aligned_neurons": {},
        },
    )
    run_dir = tmp_path / "steer"
    command = [
        PYTHON,
        str(REPO / "scripts" / "steer.py"),
        "--model-dir",
        str(tiny_model_dir),
        "--clt",
        str(clt_dir),
        "--located",
        str(located),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--from",
        "fr",
        "--to",
        "de",
        "--methods",
        "entropy,random-entropy,oracle,diffmean,lape",
        "--strengths",
        "0,2",
        "--n-prompts",
        "6",
        "--prompt-tokens",
        "6",
        "--new-tokens",
        "4",
        "--n-ctx",
        "16",
        "--blocks-per-lang",
        "4",
        "--run-dir",
        str(run_dir),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    methods = ["entropy", "random-entropy", "oracle", "diffmean", "lape"]
    assert len(records) == 2 * (1 + len(methods) * 2)  # (unsteered + 5 methods × 2 strengths) × 2 decodings
    assert all(
        r["n"] in (6, 18)
        and 0 <= r["success"] <= 1
        and r["success_ci"][0] <= r["success"] <= r["success_ci"][1]
        and 0 <= r["first_token_target"] + r["first_token_source"] <= 1 + 1e-6  # p > 0.5: one language
        for r in records
    )
    none = next(r for r in records if r["method"] == "none" and r["decoding"] == "greedy")
    assert none["prompt_kl"] == pytest.approx(0.0, abs=1e-6)
    # the unsteered run sets the pair's degeneracy bar: 0.8 × its mean distinct-token share
    assert none["min_distinct"] == pytest.approx(0.8 * none["distinct"])
    assert {r["min_distinct"] for r in records if r["decoding"] == "greedy"} == {none["min_distinct"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    frontier = summary["frontier"]["greedy"]
    assert set(frontier["per_pair"]["fr->de"]) == {"none", *methods}
    assert set(frontier["mean"]["entropy"]) == {"0.5", "1.0"}
    assert (run_dir / "frontier.png").exists() and "fr->de" in (run_dir / "summary.md").read_text()
    span = summary["span"]
    assert len(span["oracle_fit"]) == 2 and all(0 <= v <= 1 + 1e-6 for v in span["entropy"]["features"])
    assert span["oracle_fit"][1] > 0  # the oracle rebuilds part of the direction
    again = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(records)  # nothing redone

    # a user's own prompts, and one prompt side by side
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(
        json.dumps({"text": "Die Datei wird gespeichert.", "lang": "de"})
        + "\n"
        + json.dumps({"text": "Die Tabelle enthält Daten.", "lang": "de"})
        + "\n"
    )
    base = command[: command.index("--from")]
    own = subprocess.run(
        base
        + [
            "--prompts",
            str(prompt_file),
            "--to",
            "fr",
            "--methods",
            "entropy,diffmean",
            "--strengths",
            "1",
            "--decodings",
            "greedy",
            "--new-tokens",
            "4",
            "--n-ctx",
            "16",
            "--blocks-per-lang",
            "4",
            "--run-dir",
            str(tmp_path / "own"),
        ],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert own.returncode == 0, own.stderr[-3000:]
    own_records = [json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["source"], r["target"]) for r in own_records} == {("de", "fr")} and all(
        r["n"] == 2 for r in own_records
    )
    one = subprocess.run(
        base
        + [
            "--prompt",
            "Die Datei wird in dem Ordner gespeichert",
            "--to",
            "fr",
            "--methods",
            "entropy,diffmean",
            "--new-tokens",
            "4",
            "--n-ctx",
            "16",
            "--blocks-per-lang",
            "4",
            "--run-dir",
            str(tmp_path / "one"),
        ],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "unsteered" in one.stdout and "entropy @4" in one.stdout and "diffmean @1" in one.stdout
    for bad, message in (
        (["--prompt", "Die Datei", "--from", "de", "--to", "xx"], "xx"),
        (["--prompt", " ", "--from", "de", "--to", "fr"], "empty prompt"),
        (["--prompt", "Die Datei " * 40, "--from", "de", "--to", "fr"], "context"),
    ):
        failed = subprocess.run(
            base + bad + ["--n-ctx", "16", "--run-dir", str(tmp_path / "bad")],
            env=script_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert failed.returncode != 0 and message in failed.stderr and "Traceback" not in failed.stderr


def test_sae_lens_training_loading_and_latent_edits(setup, tmp_path):
    """A tiny residual SAE trained by sae-lens's own runner on our model loads back in sae-lens's format;
    an SAEEdit moves the residual by exactly Δz · W_dec at the edited positions only."""
    from interventions.sae import SAEEdit, load_sae, sae_layer, train_residual_sae

    model, _, ids = setup
    blocks = torch.randint(2, 500, (256, 16), generator=torch.Generator().manual_seed(3))
    blocks[:, 0] = 1
    train_residual_sae(model, None, blocks, layer=1, out_dir=tmp_path / "sae", d_sae=64, training_tokens=4096)
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.d_sae == 64 and sae_layer(tmp_path / "sae") == 1
    from analysis.residuals import residual_stream

    with torch.no_grad():
        clean = residual_stream(model, ids)[1]
        z = sae.encode(clean)
        latent = int(z[:, 5].abs().sum(0).argmax())  # a latent active at position 5
        with Intervener(model, None, [SAEEdit(1, sae, [latent], "set", 3.0, Where(positions=(5,)))]):
            edited = residual_stream(model, ids)[1]
    expected = clean.clone()
    expected[:, 5] += (3.0 - z[:, 5, latent])[:, None] * sae.W_dec[latent]
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


def test_steer_script_locates_units_itself_without_a_located_file(
    setup, tiny_model_dir, real_slice_corpus_dir, tmp_path
):
    import json
    import subprocess

    from clt.export import save_native
    from tests.conftest import PYTHON, REPO, script_env
    from training.fingerprint import model_fingerprint

    _, clt, _ = setup
    clt_dir = save_native(
        clt,
        tmp_path / "clt",
        {"model_dir": str(tiny_model_dir), "model_sha256": model_fingerprint(tiny_model_dir)},
    )
    command = [
        PYTHON,
        str(REPO / "scripts" / "steer.py"),
        "--model-dir",
        str(tiny_model_dir),
        "--clt",
        str(clt_dir),
        "--located",
        str(tmp_path / "missing.json"),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--from",
        "de",
        "--to",
        "fr",
        "--methods",
        "clt,diffmean",
        "--strengths",
        "1",
        "--n-prompts",
        "4",
        "--prompt-tokens",
        "6",
        "--new-tokens",
        "3",
        "--n-ctx",
        "16",
        "--blocks-per-lang",
        "4",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "locating feature sets" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {
        "none",
        "clt",
        "diffmean",
    }  # clt may be recorded as an error (no features)
