"""`scripts/reproduce.py` end to end on the corpus slice with micro settings: every stage runs, the
report has its structure, and every number in it is what a stage's output file holds."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from analysis import claims, provenance
from analysis.reproduce import ReproduceConfig, all_numbers, fmt, reproduce, verify_all
from tests.helpers import micro_base_models
from training import base_models
from training.errors import UserError

MAIN, NO_ENGLISH = "en=0.5,fr=0.25,de=0.25", "fr=0.5,de=0.5"


def test_provenance_reads_derives_and_catches_a_changed_file(tmp_path):
    source = tmp_path / "out.json"
    source.write_text(json.dumps({"a": {"b": [1.0, 3.0]}, "n": 100, "p": 0.5, "label": "x"}))
    one, three = provenance.read(source, "/a/b/0"), provenance.read(source, "/a/b/1")
    mean = provenance.derive("mean", one, three)
    assert mean.value == 2.0 and provenance.verify(mean)
    assert provenance.derive("twice", provenance.derive("sem", one, three)).value == pytest.approx(2.0)
    low = provenance.derive("wilson_low", provenance.read(source, "/p"), provenance.read(source, "/n"))
    assert low.value == pytest.approx(0.40383, abs=1e-5)  # the 95% Wilson bound of 50 of 100
    with pytest.raises(ValueError, match="not a number"):
        provenance.read(source, "/label")
    with pytest.raises(ValueError, match="has no /a/c"):
        provenance.read(source, "/a/c")
    source.write_text(json.dumps({"a": {"b": [1.5, 3.0]}, "n": 100, "p": 0.5, "label": "x"}))
    assert not provenance.verify(mean)  # a number no longer in its source is caught


def test_reproduce_end_to_end_on_micro_settings(tmp_path, real_slice_corpus_dir, monkeypatch):
    monkeypatch.setattr(base_models, "calibrate", lambda config, vocab_size: 100.0)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(
        json.dumps(
            {
                "mixtures": [MAIN, NO_ENGLISH],
                "roles": {"main": MAIN, "no_english": NO_ENGLISH},
                # (64 features: the steering claim's random control needs unselected features per layer)
                "models": {**micro_base_models(real_slice_corpus_dir, MAIN), "clt_n_features": 64},
                "overlap": {"langs": ["en", "fr"], "n_paragraphs": 4, "min_tokens": 4, "max_tokens": 64},
                "steer": {
                    "langs": ["en", "fr"],
                    "strengths": [1.0],
                    "n_prompts": 4,
                    "prompt_tokens": 6,
                    "new_tokens": 3,
                    "n_ctx": 16,
                    "blocks_per_lang": 4,
                },
                "linguamap": {
                    "langs": ["en", "fr", "de"],
                    "max_items": 10,
                    "shots": [0],
                    "modes": ["likelihood"],
                },
                "finetune": {
                    "data": {"train_subdirs": ["shared/optionen"]},
                    "compare": {
                        "seeds": [0, 1],
                        "lrs": [1e-3],
                        "max_steps": 2,
                        "linguamap_items": 4,
                        "target_langs": ["fr", "de"],
                    },
                },
                # The slice has no Basque: the weak language of the diff stage is German here.
                "diff": {
                    "finetune": {
                        "scenario": "consistency",
                        "mixture": "de=1",
                        "target_langs": ["de"],
                        "max_steps": 6,
                        "micro_batch": 4,
                        "warmup_steps": 2,
                        "eval_every": 3,
                        "eval_blocks": 2,
                        "ckpt_every": 3,
                        "gen_prompts": 2,
                        "gen_prompt_tokens": 6,
                        "gen_new_tokens": 4,
                        "token_budget": 6000,
                    },
                    "crosscoder": {
                        "collect_mixture": MAIN,
                        "collect_n_tokens": 6000,
                        "collect_n_ctx": 16,
                        "collect_blocks_per_shard": 8,
                        "n_features": 32,
                        "k": 4,
                        "batch_size": 64,
                        "max_steps": 12,
                        "warmup_steps": 2,
                        "log_every": 4,
                    },
                    "report": {
                        "langs": ["en", "fr", "de"],
                        "focus_lang": "de",
                        "n_ctx": 16,
                        "blocks_per_lang": 4,
                        "graph_prompts": 0,
                    },
                },  # fmt: skip
            }
        )
    )
    config = ReproduceConfig(
        scale="tiny",
        run_dir=str(tmp_path / "reproduce"),
        corpus_dir=str(real_slice_corpus_dir),
        report_dir=str(tmp_path / "docs"),
        overrides=str(overrides),
        device="cpu",
    )
    # Two processes may share the cores, each running a subset of the stages; neither writes a report.
    first = reproduce(dataclasses.replace(config, stages=["overlap", "steer"]))
    assert [s["stage"] for s in first["stages"]] == ["corpus", "models", "overlap", "steer"]
    reproduce(dataclasses.replace(config, stages=["linguamap", "finetune", "diff"]))
    assert not (tmp_path / "docs").exists()
    with pytest.raises(UserError, match="unknown --stages"):
        reproduce(dataclasses.replace(config, stages=["steering"]))
    # The call with every stage reuses what the two did and writes the report.
    results = reproduce(config)
    assert [s["seconds"] for s in results["stages"][2:]] == [s["seconds"] for s in first["stages"][2:]] + [
        s["seconds"] for s in results["stages"][4:]
    ]
    assert [c["key"] for c in results["claims"]] == ["a", "b", "c", "d", "e", "f", "g", "h"]
    assert all(c["verdict"] in ("reproduced", "not reproduced", "inconclusive") for c in results["claims"])
    assert set(results["quality"]) == {MAIN, NO_ENGLISH}
    assert {s["stage"] for s in results["stages"]} == {
        "corpus",
        "models",
        "overlap",
        "steer",
        "linguamap",
        "finetune",
        "diff",
    }

    # Every number is what its source file holds, and the report shows no number that is not one of them.
    assert verify_all(results) == []
    shown = {fmt(n) for n in all_numbers(results)}
    report = (tmp_path / "docs" / "RESULTS-tiny.md").read_text()
    claim_rows = [line for line in report.splitlines() if line.startswith("| (")]
    assert len(claim_rows) == 8
    for line in report.splitlines():
        if line.startswith("|") and not line.startswith("|---") and "seconds" not in line:
            for cell in line.strip("|").split("|")[1:]:
                for token in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", cell):
                    assert token in shown, f"{token} in {line!r} is not a stage's number"
    saved = json.loads((tmp_path / "docs" / "results-tiny.json").read_text())
    assert saved["claims"][0]["number"]["inputs"][0]["source"].endswith("overlap.json")  # parallel − null
    assert "data:image/png;base64," in (tmp_path / "docs" / "results-tiny.html").read_text()
    # Each plot is copied next to the report and shown inline (runs/ is not committed).
    shown_plots = re.findall(r"!\[plot of claim \((\w)\)\]\(([^)]+)\)", report)
    assert {key for key, _ in shown_plots} == {c["key"] for c in results["claims"]}
    for key, relative in shown_plots:
        copied = tmp_path / "docs" / relative
        source = next(c for c in results["_objects"]["claims"] if c.key == key).plot
        assert copied.read_bytes() == Path(source).read_bytes()

    # Resumed: the stages are reused (same wall times), the answer is the same.
    again = reproduce(config)
    assert again["stages"] == results["stages"]
    assert json.dumps(again["claims"]) == json.dumps(results["claims"])  # (as text: NaN ≠ NaN)

    # A released model is adopted where this machine did not train that mixture: nothing is trained,
    # the release's own files are used, only the location report is re-run on it.
    from analysis.reproduce import models_stage, scale_settings
    from training.release import ReleaseConfig, release

    trained = tmp_path / "reproduce" / "models" / MAIN
    release(
        ReleaseConfig(
            name=f"micro-{MAIN}",
            pretrain_run=str(trained / "pretrain"),
            clt_run=str(trained / "clt"),
            locate_run=str(trained / "locate"),
            corpus_dir=str(real_slice_corpus_dir),
            models_root=str(tmp_path / "released"),
            eval_blocks=2,
        )
    )
    settings = scale_settings(config)
    # A second release (a copy) of a mixture no claim locates in: adopted without a location run.
    shutil.copytree(tmp_path / "released" / f"micro-{MAIN}", tmp_path / "released" / "micro-other")
    settings.update(mixtures=[MAIN, "other"], releases=str(tmp_path / "released" / "micro-{mixture}"))
    fresh = tmp_path / "fresh-clone"
    both = models_stage(config, settings, fresh)
    adopted = both[MAIN]
    assert both["other"]["model_dir"] == str(tmp_path / "released" / "micro-other" / "model")
    assert "locate_report" not in both["other"] and not (fresh / "released" / "other").exists()
    assert not (fresh / "models").exists()  # nothing trained
    assert adopted["model_dir"] == str(tmp_path / "released" / f"micro-{MAIN}" / "model")
    assert adopted["located"].startswith(str(tmp_path / "released"))
    assert json.loads(open(adopted["locate_report"]).read())["sections"]["lens"]["langs"]
    # Only what the claims read is recomputed: the release's located units are not selected again.
    assert sorted(p.stem for p in (fresh / "released" / MAIN / "locate" / "sections").glob("*.json")) == [
        "lens",
        "probes",
    ]
    quality = claims.released_quality(adopted["manifest"])
    assert all(provenance.verify(n) for n in quality.values())
    assert quality["CLT mean L0"].value == pytest.approx(
        json.loads((trained / "clt" / "summary.json").read_text())["heldout"]["all"]["mean_l0"]
    )


def test_selective_claim_reads_each_strategy_at_its_chosen_rate(tmp_path):
    """(g) by hand: seed means at each variant's validation-chosen rate, the ratio's delta-method band,
    and the verdict rule's three outcomes."""

    def comparison(selective_values, random_values):
        runs, table = [], []
        for variant, lr, values in (
            ("full", 1e-3, [0.9, 0.92, 0.94]),
            ("full", 3e-3, [0.1, 0.1, 0.1]),  # not chosen: its test numbers must not be read
            ("last-k", 3e-3, selective_values),
            ("random~last-k", 3e-3, random_values),
        ):
            runs += [
                {"scenario": "linguamap", "variant": variant, "lr": lr, "seed": s, "target_after": v}
                for s, v in enumerate(values)
            ]
            table.append(
                {
                    "scenario": "linguamap",
                    "variant": variant,
                    "lr": lr,
                    "chosen": lr == 3e-3 or variant == "full" and lr == 1e-3,
                    "target_before": 0.3,
                    "trainable_share": 0.05,
                    "forgetting": [0.1, 0.0],
                    "accuracy_likelihood": [0.4, 0.0],
                }
            )
        table[1]["chosen"] = False
        path = tmp_path / f"comparison-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"runs": runs, "table": table}))
        return path

    path = comparison([0.92, 0.93, 0.94], [0.5, 0.55, 0.6])
    result = claims.selective_matches_full(path, "last-k", "random~last-k", "m")
    assert result.number.value == pytest.approx(0.93 / 0.92)
    sem_full, sem_sel = 0.02 / 3**0.5, 0.01 / 3**0.5
    expected_band = 2 * (0.93 / 0.92) * ((sem_sel / 0.93) ** 2 + (sem_full / 0.92) ** 2) ** 0.5
    assert result.uncertainty.value == pytest.approx(expected_band)
    assert result.verdict == "reproduced" and provenance.verify(result.number)
    assert result.details["full: learning rate"].value == 1e-3
    # Far below full fine-tuning: refuted; near it but no better than random: inconclusive.
    low = claims.selective_matches_full(comparison([0.5, 0.52, 0.54], [0.3, 0.3, 0.31]), "last-k",
                                        "random~last-k", "m")  # fmt: skip
    assert low.verdict == "not reproduced"
    tied = claims.selective_matches_full(comparison([0.92, 0.93, 0.94], [0.91, 0.93, 0.95]), "last-k",
                                         "random~last-k", "m")  # fmt: skip
    assert tied.verdict == "inconclusive"


def test_base_scale_trains_the_released_models_recipe():
    # The base scale pins the released base models' step budget and vocabulary: a machine of another
    # speed must train the same models, not recalibrate a new budget.
    from pathlib import Path

    from analysis.reproduce import SCALES
    from training.base_models import BaseModelsConfig
    from training.config import config_from_dict

    config = config_from_dict(BaseModelsConfig, SCALES["base"]["models"])
    tokens_per_step = config.pretrain.micro_batch * 1024  # the base preset's context
    assert config.pretrain.preset == "base" and config.pretrain.grad_accum == 1
    root = Path(__file__).resolve().parents[1]  # tokenizer_dir is relative to the repository root
    for name in ("base-balanced", "base-en-heavy"):
        manifest = json.loads((root / "models" / name / "MANIFEST.json").read_text())
        assert manifest["metrics"]["model"]["tokens_trained"] == config.steps * tokens_per_step
    released = root / config.tokenizer_dir / "tokenizer.json"
    assert released.read_bytes() == (root / "models/base-en-heavy/model/tokenizer.json").read_bytes()


def test_released_quality_reads_the_manifest_and_tolerates_an_older_release(tmp_path):
    manifest = tmp_path / "MANIFEST.json"
    metrics = {
        "model": {"validation_nats_per_char": {"en": 1.5, "fr": 1.25}},
        "clt": {"heldout_fvu": [0.01, 0.03], "heldout_never_active_fraction": [0.0, 0.25]},
        "fp16": {"replacement_kl_released": 0.02, "replacement_kl_original": 0.019},
    }
    manifest.write_text(json.dumps({"metrics": metrics}))
    quality = claims.released_quality(manifest)  # (released before the manifest recorded L0)
    assert {name: n.value for name, n in quality.items()} == {
        "nats/char en": 1.5,
        "nats/char fr": 1.25,
        "CLT mean FVU": pytest.approx(0.02),
        "CLT never-active, worst layer": 0.25,
        "replacement KL": 0.02,  # measured on the released files, not the fp32 original
    }
    metrics["clt"]["heldout_l0"] = [10.0, 30.0]
    manifest.write_text(json.dumps({"metrics": metrics}))
    assert claims.released_quality(manifest)["CLT mean L0"].value == 20.0


def test_report_numbers_keep_their_digits():
    """A learning rate of 3e-4 must not read 0.000; ordinary values keep three decimals."""
    value = lambda v: provenance.Measured(v, "test.json", "/x")  # noqa: E731
    assert [fmt(value(v)) for v in (3e-4, -2e-5, 0.0, 0.0005, 0.433, 978.0)] == [
        "3.0e-04", "-2.0e-05", "0.000", "0.001", "0.433", "978.000",
    ]  # fmt: skip
    assert fmt(None) == "—"


def test_overlap_runs_on_the_models_its_claims_read(monkeypatch):
    """(a) reads the main model's overlap and (e) the one without English: no other model is run."""
    import analysis.reproduce as reproduce_module

    seen = {}

    def per_model_stage(config, settings, root, models, *rest):
        seen.update(models)
        return {}

    monkeypatch.setattr(reproduce_module, "per_model_stage", per_model_stage)
    settings = {"roles": {"main": "a", "no_english": "c"}}
    reproduce_module.overlap_stage(None, settings, Path("unused"), {"a": {}, "b": {}, "c": {}})
    assert sorted(seen) == ["a", "c"]
