"""Selective fine-tuning: exact masking per strategy, parameter counts, tied embeddings, LoRA, the
located-units contract, and a whole run of scripts/finetune.py on the tiny model."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from analysis.located import save_located
from tests.conftest import PYTHON, REPO, script_env
from training import selection as select
from training.config import RunDir
from training.errors import UserError
from training.finetune import FinetuneConfig, build_selection, resolve
from training.fingerprint import model_fingerprint
from training.loop import Dist, make_optimizer, train_steps
from training.lora import add_lora, lora_count, merge_lora
from training.models import build_model, gpt2_config

D_MODEL, N_LAYER, VOCAB, CTX = 32, 4, 64, 16


def small_model(seed: int = 0):
    config = gpt2_config(
        "tiny",
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=1,
        n_layer=N_LAYER,
        n_embd=D_MODEL,
        n_head=2,
        n_ctx=CTX,
    )
    return build_model(config, seed)


def train_a_few_steps(model, selection, tmp_path, restore: bool = True, steps: int = 4):
    """The shared training loop, with large weight decay so any leak into frozen entries shows."""
    config = FinetuneConfig(
        max_steps=steps,
        micro_batch=4,
        lr=1e-2,
        warmup_steps=1,
        weight_decay=0.5,
        log_every=2,
        eval_every=steps,
        ckpt_every=steps,
        device="cpu",
    )
    masked = select.MaskedTraining(model, selection)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, VOCAB, (32, CTX), generator=generator)
    state = {"step": 0, "tokens": 0, "train_time_s": 0.0, "wall_time_s": 0.0}
    train_steps(
        model,
        optimizer,
        blocks,
        {"xx": blocks[:4]},
        config,
        RunDir(tmp_path),
        Dist(),
        torch.device("cpu"),
        state,
        steps,
        after_step=masked.restore if restore else None,
    )
    return optimizer


def trainable_mask(model, selection) -> dict[str, torch.Tensor]:
    return {
        name: (
            torch.ones_like(p, dtype=torch.bool)
            if selection.masks.get(name, "absent") is None
            else selection.masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        )
        for name, p in model.named_parameters()
    }


SELECTIONS = {
    "full": lambda m: select.full(m),
    "last-k": lambda m: select.last_k(m, 1),
    "outermost": lambda m: select.outermost(m),
    "neurons": lambda m: select.neurons(m, [(0, 3), (0, 70), (2, 5), (3, 127)]),
    "random~neurons": lambda m: select.random_like(m, select.neurons(m, [(0, 3), (2, 5)]), seed=1),
    "random~last-k": lambda m: select.random_like(m, select.last_k(m, 1), seed=1),
    "neurons+embeddings": lambda m: select.with_embeddings(m, select.neurons(m, [(1, 1)])),
    "embeddings": lambda m: select.embeddings(m),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_masked_training_changes_only_the_selection(name, tmp_path):
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    selection = SELECTIONS[name](model)
    optimizer = train_a_few_steps(model, selection, tmp_path)
    masks = trainable_mask(model, selection)
    for param_name, param in model.named_parameters():
        frozen = ~masks[param_name]
        assert torch.equal(param.detach()[frozen], before[param_name][frozen]), (
            f"{param_name}: a frozen entry moved"
        )
        if masks[param_name].any() and param.dim() >= 2:
            assert not torch.equal(param.detach()[masks[param_name]], before[param_name][masks[param_name]])
        # Optimizer state: frozen tensors have none; partly frozen ones have exactly zero moments there.
        state = optimizer.state.get(param, {})
        if not masks[param_name].any():
            assert not state and not param.requires_grad
        elif frozen.any():
            assert torch.count_nonzero(state["exp_avg"][frozen]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][frozen]) == 0
    # GPT-2's tie survives: the head is the embedding, whatever trained.
    assert model.lm_head.weight is model.transformer.wte.weight


def test_without_the_restore_weight_decay_moves_frozen_entries(tmp_path):
    """The control for the test above: gradient masking alone is not exact under AdamW's weight decay."""
    model = small_model()
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    selection = select.neurons(model, [(0, 3)])
    train_a_few_steps(model, selection, tmp_path, restore=False)
    after = model.transformer.h[0].mlp.c_fc.weight.detach()
    frozen = ~selection.masks["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(after[frozen], before[frozen])


def test_parameter_counts_by_hand():
    model = small_model()
    d, inner, V, L = D_MODEL, 4 * D_MODEL, VOCAB, N_LAYER
    block = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * inner + inner) + (inner * d + d)
    total = V * d + CTX * d + L * block + 2 * d  # the tied head is counted once
    assert select.count(model, select.full(model)) == {"trainable": total, "total": total, "share": 1.0}
    assert select.count(model, select.last_k(model, 2))["trainable"] == 2 * block
    assert select.outermost(model).layers == [0, 3]  # 25% of 4 blocks, at least one on each side
    units = [(0, 3), (0, 70), (2, 5)]
    assert select.count(model, select.neurons(model, units))["trainable"] == len(units) * (2 * d + 1)
    assert (
        select.count(model, select.with_embeddings(model, select.neurons(model, units)))["trainable"]
        == len(units) * (2 * d + 1) + V * d + CTX * d
    )
    assert select.count(model, select.embeddings(model))["trainable"] == V * d + CTX * d


def test_random_subsets_match_the_reference_and_avoid_it():
    model = small_model()
    reference = select.neurons(model, [(0, 3), (0, 70), (2, 5), (3, 127)])
    for seed in range(3):
        random = select.random_like(model, reference, seed)
        assert select.count(model, random) == select.count(model, reference)
        assert sorted(layer for layer, _ in random.neurons) == sorted(layer for layer, _ in reference.neurons)
        assert not set(random.neurons) & set(reference.neurons)
    layers = select.random_like(model, select.last_k(model, 1), seed=0)
    assert len(layers.layers) == 1 and layers.layers != [3]
    outer = select.outermost(model)
    middle = select.random_like(model, outer, seed=0)  # compare's random~outermost
    assert middle.layers == [1, 2] and select.count(model, middle) == select.count(model, outer)
    with pytest.raises(ValueError, match="cannot match"):
        select.random_like(model, select.full(model), seed=0)


def test_bad_selections_fail_early():
    model = small_model()
    with pytest.raises(ValueError, match="do not exist"):
        select.neurons(model, [(0, 10_000)])
    with pytest.raises(ValueError, match="no neurons"):
        select.neurons(model, [])
    with pytest.raises(ValueError, match="1 ≤ k"):
        select.last_k(model, 9)
    with pytest.raises(ValueError, match="unknown strategy"):
        resolve(FinetuneConfig(strategy="everything"))
    with pytest.raises(ValueError, match="unknown scenario"):
        resolve(FinetuneConfig(scenario="poetry"))


def test_target_languages_without_a_mixture_train_in_equal_parts():
    from training.mixtures import parse_mixture

    chosen = resolve(FinetuneConfig(scenario="consistency", target_langs=["fr", "de", "ru"]))
    assert parse_mixture(chosen.mixture) == pytest.approx({"fr": 1 / 3, "de": 1 / 3, "ru": 1 / 3}, abs=1e-5)
    own = resolve(FinetuneConfig(scenario="consistency", target_langs=["fr"], mixture="fr=0.5,en=0.5"))
    assert own.mixture == "fr=0.5,en=0.5"  # a mixture given is kept
    assert resolve(FinetuneConfig(scenario="adapt-eu")).target_langs == ["eu"]


def test_lora_leaves_the_base_weights_and_merges_exactly(tmp_path):
    model = small_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = add_lora(model, rank=4, alpha=8, seed=0)
    counts = lora_count(peft_model)
    # A: [r, in], B: [out, r] per adapted Conv1D: c_attn (d→3d), attn c_proj (d→d), c_fc (d→4d), mlp c_proj
    # (4d→d).
    d, r = D_MODEL, 4
    per_block = r * (d + 3 * d) + r * (d + d) + r * (d + 4 * d) + r * (4 * d + d)
    assert counts["trainable"] == N_LAYER * per_block and counts["total"] == sum(
        base[n].numel() for n in base
    )
    config = FinetuneConfig(
        max_steps=3,
        micro_batch=4,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=3,
        ckpt_every=3,
        device="cpu",
    )
    optimizer = make_optimizer(peft_model, config)
    blocks = torch.randint(2, VOCAB, (16, CTX), generator=torch.Generator().manual_seed(0))
    train_steps(
        peft_model,
        optimizer,
        blocks,
        {"xx": blocks[:4]},
        config,
        RunDir(tmp_path),
        Dist(),
        torch.device("cpu"),
        {"step": 0, "tokens": 0, "train_time_s": 0.0, "wall_time_s": 0.0},
        3,
    )
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param.detach(), base[plain]), f"LoRA training moved base weight {plain}"
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=blocks[:2]).logits
        merged = merge_lora(peft_model)
        assert not torch.allclose(
            adapted, model_logits(small_model(), blocks[:2])
        )  # the adapters did something
        torch.testing.assert_close(merged(input_ids=blocks[:2]).logits, adapted, rtol=1e-5, atol=1e-5)


def model_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def located_file(tmp_path, model_dir, model, neurons: dict, features_neurons: dict) -> str:
    langs = ["en", "fr", "de"]
    doc = {
        "model_dir": str(model_dir),
        "model_sha256": model_fingerprint(model_dir),
        "clt_dir": None,
        "langs": langs,
        "n_layers": model.config.n_layer,
        "layers": {
            "decision": {lang: None for lang in langs},
            "language_features": {"fr": [1], "de": [0], "en": []},
            "lape_neurons": {lang: [] for lang in langs},
        },
        "neurons": neurons,
        "neurons_5pct": neurons,
        "features": {lang: [] for lang in langs},
        "feature_aligned_neurons": features_neurons,
    }
    return str(save_located(tmp_path / "located.json", doc))


def test_located_units_drive_the_selection(tmp_path, tiny_model_dir):
    from training.models import load_model

    model, _ = load_model(tiny_model_dir, torch.device("cpu"))
    path = located_file(
        tmp_path,
        tiny_model_dir,
        model,
        neurons={"fr": [[0, 1], [1, 7]], "de": [[1, 2]], "en": []},
        features_neurons={"fr": [[1, 9]], "de": [], "en": []},
    )
    base = FinetuneConfig(
        model_dir=str(tiny_model_dir), located=path, scenario="consistency", target_langs=["fr"]
    )
    lape = build_selection(resolve(dataclass_replace(base, strategy="lape")), model)
    assert lape.neurons == [(0, 1), (1, 7)]
    located = build_selection(resolve(dataclass_replace(base, strategy="located")), model)
    assert located.neurons == [(1, 9)]
    layers = build_selection(
        resolve(
            dataclass_replace(
                base, strategy="located", located_units="feature_layers", target_langs=["fr", "de"]
            )
        ),
        model,
    )
    assert layers.layers == [0, 1] and not layers.neurons
    random = build_selection(
        resolve(dataclass_replace(base, strategy="random", random_reference="lape")), model
    )
    assert len(random.neurons) == 2 and not set(random.neurons) & {(0, 1), (1, 7)}
    with pytest.raises(ValueError, match="has no units for"):
        build_selection(resolve(dataclass_replace(base, strategy="lape", target_langs=["eu"])), model)
    with pytest.raises(ValueError, match="no neurons to train"):
        build_selection(resolve(dataclass_replace(base, strategy="located", target_langs=["de"])), model)
    # A located file made on other weights is refused.
    other = tmp_path / "other"
    model_changed, _ = load_model(tiny_model_dir, torch.device("cpu"))
    with torch.no_grad():
        model_changed.transformer.h[0].mlp.c_fc.bias.add_(1.0)
    model_changed.save_pretrained(other)
    with pytest.raises(ValueError, match="weights differ"):
        build_selection(resolve(dataclass_replace(base, strategy="lape", model_dir=str(other))), model)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_finetune_script_end_to_end(tmp_path, tiny_model_dir, real_slice_corpus_dir):
    run_dir = tmp_path / "run"
    args = [
        "--model-dir",
        str(tiny_model_dir),
        "--corpus-dir",
        str(real_slice_corpus_dir),
        "--run-dir",
        str(run_dir),
        "--scenario",
        "consistency",
        "--mixture",
        "fr=0.5,de=0.5",
        "--target-langs",
        "fr,de",
        "--strategy",
        "last-k",
        "--token-budget",
        "3000",
        "--max-steps",
        "6",
        "--micro-batch",
        "4",
        "--warmup-steps",
        "2",
        "--eval-every",
        "3",
        "--ckpt-every",
        "3",
        "--eval-blocks",
        "4",
        "--gen-prompts",
        "3",
        "--gen-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    command = [PYTHON, str(REPO / "scripts" / "finetune.py")] + args
    result = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    counts = summary["parameters"]
    assert counts["share"] == pytest.approx(counts["trainable"] / counts["total"])
    assert summary["selection"]["layers"] == [1] and summary["steps"] == 6
    assert set(summary["before"]["consistency"]) == {"fr", "de"} and summary["forgetting_langs"] == ["en"]
    assert summary["forgetting"] == pytest.approx(
        summary["after"]["loss"]["en"] - summary["before"]["loss"]["en"]
    )
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    tuned = GPT2LMHeadModel.from_pretrained(run_dir / "model")
    changed = {
        n
        for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters())
        if not torch.equal(a, b)
    }
    assert changed and all(n.startswith("transformer.h.1.") for n in changed)
    assert counts["trainable"] == sum(
        p.numel() for n, p in base.named_parameters() if n.startswith("transformer.h.1.")
    )
    assert counts["total"] == sum(p.numel() for p in base.parameters())
    assert tuned.lm_head.weight is tuned.transformer.wte.weight
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert {g["when"] for g in generations} == {"before", "after"}
    # A finished run is reported, not redone; a changed config in the same directory is refused.
    again = subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((run_dir / "summary.json").read_text()) == summary
    refused = subprocess.run(
        command + ["--lr", "0.5"], env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0 and "different config" in refused.stderr


def test_every_config_has_a_working_help():
    """argparse %-formats help text; a stray "%" in any field's help would crash `--help`."""
    import dataclasses
    import importlib
    import importlib.util

    from training.config import build_parser

    modules = []
    for package in ("training", "clt", "attribution", "analysis", "interventions"):
        for path in sorted((REPO / package).glob("*.py")):
            if "@dataclass" in path.read_text():
                modules.append(importlib.import_module(f"{package}.{path.stem}"))
    scripts_with_configs = [
        p.name for p in sorted((REPO / "scripts").glob("*.py")) if "@dataclass" in p.read_text()
    ]
    assert not scripts_with_configs, f"config dataclasses belong in library modules: {scripts_with_configs}"
    configs = [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__ == module.__name__
        and value.__name__.endswith("Config")
        and all(f.metadata.get("help") for f in dataclasses.fields(value))
    ]
    assert len(configs) >= 12, [c.__name__ for c in configs]
    for config in configs:
        assert "--" in build_parser(config).format_help(), config.__name__


def test_comparison_table_by_hand():
    from training import compare

    row = {
        "scenario": "adapt-eu",
        "metric": "target_loss",
        "target_before": 6.0,
        "share": 0.1,
        "trainable": 10,
    }
    rows = [
        {**row, "variant": "full", "seed": 0, "target_after": 3.0, "forgetting": 2.0, "train_time_s": 10.0},
        {**row, "variant": "full", "seed": 1, "target_after": 3.0, "forgetting": 2.0, "train_time_s": 12.0},
        {**row, "variant": "lape", "seed": 0, "target_after": 5.0, "forgetting": 0.2, "train_time_s": 5.0},
        {**row, "variant": "lape", "seed": 1, "target_after": 5.5, "forgetting": 0.4, "train_time_s": 7.0},
        {"scenario": "adapt-eu", "variant": "located", "seed": 0, "skipped": "no units"},
    ]
    lines = {line["variant"]: line for line in compare.table(rows)}
    assert lines["lape"]["target_after"][0] == pytest.approx(5.25)
    assert lines["lape"]["gain_vs_full"] == pytest.approx((5.25 - 6.0) / (3.0 - 6.0))
    assert lines["lape"]["forgetting"][0] == pytest.approx(0.3) and lines["lape"]["train_time_min_s"] == 5.0
    assert lines["located"]["skipped"] == "no units"
    text = compare.markdown(list(lines.values()))
    assert (
        "not run: no units" in text and "| adapt-eu | lape | default | 6.000 | 5.250 ± 0.354 | 0.25 |" in text
    )


def test_learning_rate_is_chosen_per_strategy_on_validation_not_test():
    from training import compare

    def row(variant, lr, seed, validation, test):
        return {
            "scenario": "linguamap",
            "variant": variant,
            "lr": lr,
            "seed": seed,
            "metric": "linguamap",
            "target_before": 0.2,
            "target_after": test,
            "validation_after": validation,
            "forgetting": 0.0,
            "share": 0.1,
            "trainable": 10,
            "train_time_s": 1.0,
        }

    rows = [
        row("full", 1e-3, 0, 0.5, 0.9),
        row("full", 1e-3, 1, 0.5, 0.9),  # best on test, not on validation
        row("full", 1e-2, 0, 0.8, 0.6),
        row("full", 1e-2, 1, 0.7, 0.6),
        row("last-k", 1e-3, 0, 0.9, 0.5),
        row("last-k", 1e-2, 0, 0.3, 0.8),
    ]
    lines = compare.table(rows)
    chosen = {(line["variant"], line["lr"]) for line in lines if line["chosen"]}
    assert chosen == {("full", 1e-2), ("last-k", 1e-3)}
    last_k = next(line for line in lines if line["variant"] == "last-k" and line["chosen"])
    # gain relative to full fine-tuning at full's chosen rate: (0.5 − 0.2) / (0.6 − 0.2)
    assert last_k["gain_vs_full"] == pytest.approx(0.75) and last_k["chosen_on"] == "validation"
    assert len(lines) == 4 and "0.01 ✓" in compare.markdown(lines)


def test_outcome_shares_per_scenario_by_hand():
    """The per-scenario table: each run's test cells averaged over languages within a scenario, then
    mean ± sd over the seeds of the chosen rate; the model before fine-tuning comes first."""
    from training import compare

    def cells(correct_fr: float, wrong_de: float) -> list[dict]:
        out = []
        for scenario in ("2", "4"):
            for lang, (c, w) in {"fr": (correct_fr, 0.0), "de": (0.0, wrong_de)}.items():
                for mode in ("generation", "likelihood"):
                    shares = {"correct": c, "other_language": 0.0, "wrong_expected_language": w}
                    shares["other"] = 1 - c - w
                    out.append({"scenario": scenario, "lang": lang, "mode": mode, "n": 10, **shares})
        return out

    summaries = [
        {"after": {"linguamap": {"test": cells(0.4, 0.2)}}, "before": {"linguamap": {"test": cells(0, 0)}}},
        {"after": {"linguamap": {"test": cells(0.2, 0.6)}}, "before": {"linguamap": {"test": cells(0, 0)}}},
    ]
    rows = [
        {
            "scenario": "linguamap",
            "variant": "full",
            "lr": 1e-3,
            "seed": seed,
            "metric": "linguamap",
            "target_before": 0.0,
            "target_after": 0.5,
            "validation_after": 0.5,
            "forgetting": 0.0,
            "share": 1.0,
            "trainable": 10,
            "train_time_s": 1.0,
            "linguamap_by_scenario": compare._by_scenario(summary, "after"),
            "linguamap_before_by_scenario": compare._by_scenario(summary, "before"),
        }  # fmt: skip
        for seed, summary in enumerate(summaries)
    ]
    (line,) = compare.table(rows)
    generation = line["outcomes_by_scenario"]["4"]["generation"]
    # seed 0: correct (0.4 + 0) / 2 = 0.2, seed 1: 0.1 → mean 0.15, sd of (0.2, 0.1)
    assert generation["correct"][0] == pytest.approx(0.15)
    assert generation["correct"][1] == pytest.approx(0.0707107, rel=1e-5)
    assert generation["wrong_expected_language"][0] == pytest.approx((0.1 + 0.3) / 2)
    text = compare.outcome_markdown([line])
    before, after = "| before fine-tuning |  | 2 | 0.000", "| full | 0.001 | 2 | 0.150 ± 0.071"
    assert text.index(before) < text.index(after)


def test_sweep_seeds_run_other_seeds_only_at_the_chosen_rate(monkeypatch, tmp_path):
    """The learning-rate sweep runs on the first seed; the other seeds run at the rate it chose, and the
    table's choice (over the seeds every rate ran) is the same one."""
    from training import compare

    calls = []
    validation = {1e-3: 0.3, 1e-2: 0.6}  # seed 0's validation metric per rate: 1e-2 wins

    def fake_finetune(run):
        calls.append((run.lr, run.seed))
        # later seeds at the chosen rate do badly on validation; the choice must not move because of them
        value = validation[run.lr] if run.seed == 0 else 0.0
        return {
            "validation_after": value,
            "metric": "linguamap",
            "target_before": 0.2,
            "target_after": value,
            "forgetting": 0.0,
            "parameters": {"trainable": 1, "share": 0.5},
            "train_time_s": 1.0,
            "run_dir": str(tmp_path / f"{run.lr}-{run.seed}"),
        }

    monkeypatch.setattr(compare, "finetune", fake_finetune)
    config = compare.CompareConfig(
        scenarios=["consistency"],
        variants=["full"],
        seeds=[0, 1, 2],
        lrs=[1e-3, 1e-2],
        sweep_seeds=1,
        run_dir=str(tmp_path),
    )
    rows = compare.run_all(config)
    assert calls == [(1e-3, 0), (1e-2, 0), (1e-2, 1), (1e-2, 2)]
    chosen = [line for line in compare.table(rows) if line["chosen"]]
    assert len(chosen) == 1 and chosen[0]["lr"] == 1e-2 and chosen[0]["seeds"] == 3


def test_finished_only_tables_the_finished_runs_and_runs_nothing(monkeypatch, tmp_path):
    from training import compare

    def must_not_run(run):
        raise AssertionError("finished_only must not start a run")

    monkeypatch.setattr(compare, "finetune", must_not_run)
    config = compare.CompareConfig(
        scenarios=["consistency"],
        variants=["full"],
        seeds=[0, 1],
        run_dir=str(tmp_path),
        finished_only=True,
    )
    assert compare.compare_finetuning(config) == []
    assert (
        "Partial: the sweep is still running** (2 runs known to be pending"
        in (tmp_path / "comparison.md").read_text()
    )
    assert not (tmp_path / "config.json").exists()  # a look leaves the sweep's directory as it was


def test_finetune_block_length_is_bounded_by_the_model_context():
    from training.finetune import block_length

    assert block_length(FinetuneConfig(n_ctx=0), 128) == 128
    assert block_length(FinetuneConfig(n_ctx=64), 128) == 64
    with pytest.raises(UserError, match="between 1 and the model's context of 128"):
        block_length(FinetuneConfig(n_ctx=256), 128)


def test_masked_finetuning_under_torchrun(tmp_path, tiny_model_dir, real_slice_corpus_dir):
    """Two gloo ranks: the neuron masks hold on every rank and both ranks' batches count."""
    from tests.conftest import run_torchrun
    from training.models import load_model

    model, _ = load_model(tiny_model_dir, torch.device("cpu"))
    path = located_file(
        tmp_path,
        tiny_model_dir,
        model,
        neurons={"fr": [[0, 1], [1, 7]], "de": [], "en": []},
        features_neurons={"fr": [], "de": [], "en": []},
    )
    run_dir = tmp_path / "ddp"
    run_torchrun(
        "finetune.py",
        [
            "--model-dir",
            str(tiny_model_dir),
            "--corpus-dir",
            str(real_slice_corpus_dir),
            "--run-dir",
            str(run_dir),
            "--located",
            path,
            "--scenario",
            "consistency",
            "--mixture",
            "fr=1",
            "--target-langs",
            "fr",
            "--strategy",
            "lape",
            "--token-budget",
            "3000",
            "--max-steps",
            "4",
            "--micro-batch",
            "2",
            "--warmup-steps",
            "1",
            "--lr",
            "0.01",
            "--eval-every",
            "4",
            "--ckpt-every",
            "2",
            "--eval-blocks",
            "2",
            "--gen-prompts",
            "2",
            "--gen-new-tokens",
            "4",
            "--device",
            "cpu",
        ],
    )
    from transformers import GPT2LMHeadModel

    base, tuned = (
        GPT2LMHeadModel.from_pretrained(tiny_model_dir),
        GPT2LMHeadModel.from_pretrained(run_dir / "model"),
    )
    allowed = select.neurons(base, [(0, 1), (1, 7)]).masks
    for (name, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()):
        moved = a.detach() != b.detach()
        assert not (moved & ~allowed.get(name, torch.zeros_like(moved))).any(), (
            f"{name}: a frozen entry moved under DDP"
        )
    assert any((a != b).any() for a, b in zip(base.parameters(), tuned.parameters()))
    assert (
        json.loads((run_dir / "summary.json").read_text())["tokens_trained"]
        == 4 * 2 * 2 * base.config.n_positions
    )
