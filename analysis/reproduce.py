"""One command re-measures the study's claims: stages in resumable run directories, one report.

    python scripts/reproduce.py --scale tiny   # → docs/RESULTS-tiny.md, results-tiny.html, .json
    python scripts/reproduce.py --scale base   # → docs/RESULTS.md (the base models of issue #12)

Stages, each the project's ordinary entry point in its own run directory under `<run-dir>/` (a finished
stage is reused, a changed config is refused by the stage's RunDir):

0. corpus — `training.corpus.build.build_corpus` when `--corpus-dir` holds none (a fresh clone).
1. models — `training.base_models.run_base_models`: per mixture, pretraining at a wall-clock budget, its
   CLT and `locate_language` (lens, probes, similarity, LAPE, features). At `--scale base` the run
   directory is `runs/base`, the one `scripts/train_base_models.py` fills, so trained base models are
   reused as they are; a mixture this machine has not trained whose release is under models/ (the
   `releases` setting) is adopted instead — its model, CLT and located units as released, only the
   lens and probe sections re-run on the main model (what claims (b) and (c) read) — so a fresh clone
   re-measures the claims without retraining.
2. overlap — `attribution.overlap.run_overlap` on the main model and the one without English (what (a)
   and (e) read): cross-language overlap of pruned-graph features against a shuffled null.
3. steer — `interventions.sweep.run_steering` on the main model: the steering frontier of features
   chosen by output effect vs random features of the same layers, the unsteered model and the
   diff-of-means direction, at equal fluency cost.
4. linguamap — `analysis.linguamap_run.run_linguamap` on every model: the four scenarios.
5. finetune — LinguaMap's fine-tuning data (`analysis.linguamap_run.prepare_finetune_data`: training
   texts from help pages holding no held-out paragraph, the main model's held-out items split by page
   into validation and test) and `training.compare.compare_finetuning` on the main model: full
   fine-tuning vs a selective strategy vs a random subset matched to it, each at the learning rate its
   validation items choose, over seeds.
6. diff — the main model fully fine-tuned on a weak language (`training.finetune`), a crosscoder on both
   models (`clt.crosscoder_train`) and its diff report (`analysis.model_diff_report`).

Claims wired so far (analysis/claims.py): (a) shared middle-layer features, (b) late language-specific
decoding, (c) early linear decodability of language, (d) steering swaps the output language, (e) (a) on
the model trained without English, (f) a weak language's features brighten after fine-tuning on it
(crosscoder), (g) selective vs full fine-tuning under LinguaMap's protocol, (h) LinguaMap's two
bottlenecks; plus each model's and CLT's own quality. The report states which mixtures the scale trains
and the settings of each stage. `--overrides FILE` (JSON: {"mixtures": [...], "roles": {"main": ...,
"no_english": ...}, "releases": "models/base-{mixture}" or "", "models": {...}, "overlap": {...},
"steer": {...}, "linguamap": {...}, "finetune": {"data": {...}, "compare": {...}, "claim": {...}},
"diff": {"finetune": {...}, "crosscoder": {...}, "report": {...}}}, flat flag names of each stage's config)
adjusts a scale, e.g. the micro settings of the end-to-end test. `--stages` runs a subset (the models
stage always, reused), so that one-thread processes can share the cores; only a call with every stage
writes the report.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analysis import claims
from analysis.provenance import Number, leaves, verify
from training.config import RunDir, atomic_write_json, atomic_write_text, config_from_dict
from training.corpus.build import default_corpus_dir
from training.errors import UserError

# What each scale trains and how hard; anything here can be overridden with --overrides.
SCALES = {
    "tiny": {
        "mixtures": ["en-heavy", "no-en"],
        "roles": {"main": "en-heavy", "no_english": "no-en"},
        "models": {
            "pretrain_preset": "tiny",
            "pretrain_n_ctx": 128,
            "pretrain_vocab_size": 8192,
            "minutes": 8.0,
            "clt_train_tokens": 1_000_000,
            "clt_n_features": 512,
            # the tiny recipe's CLT (λ 1: replacement KL 0.048 on the tiny en-heavy model, docs/clt.md), not
            # the base models' λ 0.1 (their sharper logits needed it); eager, as when this scale was timed
            "clt_sparsity_coefficient": 1.0,
            "clt_compile": False,
            "clt_collect_n_tokens": 400_000,
            "clt_collect_n_ctx": 64,
        },
        "overlap": {"n_paragraphs": 20},
        "steer": {"langs": ["en", "fr", "de", "ru"], "n_prompts": 50},
        "linguamap": {"max_items": 150, "shots": [0, 3], "modes": ["likelihood"]},
        "finetune": {
            "data": {},
            "compare": {"seeds": [0, 1, 2], "lrs": [1e-3, 3e-3], "max_steps": 60, "linguamap_items": 40},
            "claim": {"selective": "last-k", "random": "random~last-k"},
        },
        "diff": {
            "finetune": {"scenario": "adapt-eu"},
            "crosscoder": {"collect_mixture": "balanced+eu", "collect_n_tokens": 400_000},
            "report": {"focus_lang": "eu"},
        },
    },
    "base": {
        "mixtures": ["en-heavy", "balanced", "no-en", "en-heavy+eu"],
        "roles": {"main": "en-heavy", "no_english": "no-en"},
        # a released model is used as it is (not retrained) unless this machine trained it in runs/base
        "releases": "models/base-{mixture}",
        # scripts/train_base_models.py's recipe with the released base models' budget and vocabulary
        # pinned: 2,891 steps (60 min at the 0.803 steps/s calibrated on the idle machine that trained
        # base-balanced) and base-balanced's tokenizer, so that a machine of another speed trains the
        # same models — the command that trained no-en and en-heavy+eu after the first two.
        "models": {"steps": 2891, "tokenizer_dir": "models/base-balanced/model"},
        "overlap": {"n_paragraphs": 20},
        # the settings of the base-model runs docs/steering.md and docs/linguamap.md quote (12 pairs of
        # en fr de ru; 150 items per language), so the report re-measures the numbers those pages give
        "steer": {"langs": ["en", "fr", "de", "ru"], "n_prompts": 100},
        "linguamap": {"max_items": 150},
        "finetune": {
            "data": {},
            # rates swept on seed 0, seeds 1–2 at the chosen one; 256-token blocks fit the cloze texts
            # (docs/linguamap.md: the settings of the base-model comparison)
            "compare": {
                "seeds": [0, 1, 2],
                "lrs": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                "sweep_seeds": 1,
                "max_steps": 150,
                "n_ctx": 256,
                "linguamap_items": 40,
            },
            "claim": {"selective": "last-k", "random": "random~last-k"},
        },
        "diff": {
            "finetune": {"scenario": "adapt-eu"},
            "crosscoder": {"collect_mixture": "balanced+eu", "collect_n_tokens": 800_000},
            "report": {"focus_lang": "eu"},
        },
    },
}
MODELS_DIR = {"base": "runs/base"}
# The location sections the claims read ((b) the lens, (c) the probes); see collect_claims.
CLAIM_SECTIONS = ("lens", "probes")
STAGES = ("models", "overlap", "steer", "linguamap", "finetune", "diff")


@dataclass
class ReproduceConfig:
    """Re-run every stage of the study (reusing finished ones) and write the results report."""

    scale: str = field(default="tiny", metadata={"help": "tiny (≤ 90 min on 2 cores) or base"})
    run_dir: str = field(default="", metadata={"help": "stage directories (default runs/reproduce-<scale>)"})
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()), metadata={"help": "corpus (all sources)"}
    )
    report_dir: str = field(default="docs", metadata={"help": "where RESULTS*.md/.html/.json go"})
    overrides: str = field(default="", metadata={"help": "JSON file of per-stage settings over the scale's"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    stages: list[str] = field(
        default_factory=lambda: list(STAGES[1:]),
        metadata={
            "help": "stages to run (the models stage always runs, reusing its work); a subset lets two "
            "processes share the cores — the report is written by a call that runs them all"
        },
    )


@dataclass
class Stage:
    name: str
    seconds: float
    outputs: dict


def report_name(scale: str) -> str:
    return "RESULTS" if scale == "base" else f"RESULTS-{scale}"


def scale_settings(config: ReproduceConfig) -> dict:
    if config.scale not in SCALES:
        raise UserError(f"unknown --scale {config.scale!r}; choose from {', '.join(SCALES)}")
    settings = json.loads(json.dumps(SCALES[config.scale]))
    if config.overrides:
        path = Path(config.overrides)
        if not path.exists():
            raise UserError(f"--overrides {path} not found")
        for stage, values in json.loads(path.read_text()).items():
            if stage in ("mixtures", "roles", "releases"):
                settings[stage] = values
            elif stage not in settings:
                raise UserError(f"--overrides names an unknown stage {stage!r}; stages: {', '.join(STAGES)}")
            elif stage in ("diff", "finetune"):  # (stages of several parts: each part is updated)
                for part, part_values in values.items():
                    settings[stage].setdefault(part, {}).update(part_values)
            else:
                settings[stage].update(values)
    return settings


def run_stage(run: RunDir, name: str, work) -> Stage:
    """Run (or reuse) one stage; its wall time is the one measured when it did its work."""
    done = run.keyed(("stage",))
    start = time.perf_counter()
    outputs = work()
    if (name,) not in done:
        done[(name,)] = {"stage": name, "seconds": time.perf_counter() - start}
        run.log_metrics(done[(name,)])
    return Stage(name, done[(name,)]["seconds"], outputs)


def corpus_stage(config: ReproduceConfig) -> dict:
    """The corpus every stage reads, built from Debian's packages and the other sources when absent (an
    empty cache: a fresh clone builds it here, ≈ 8 min, and the stage's time says so)."""
    from training.corpus.build import CorpusConfig, build_corpus

    if not Path(config.corpus_dir, "dataset_dict.json").exists():
        build_corpus(CorpusConfig(corpus_dir=config.corpus_dir))
    return {"corpus_dir": config.corpus_dir}


def models_stage(config: ReproduceConfig, settings: dict, root: Path) -> dict:
    """Every mixture's model, CLT and location: trained in the models run directory, or — where the scale
    names releases and one exists that was not trained here — the released model adopted."""
    from training.base_models import BaseModelsConfig, run_base_models

    runs_dir = MODELS_DIR.get(config.scale, str(root / "models"))
    released = released_models(settings, runs_dir)
    to_train = [mixture for mixture in settings["mixtures"] if mixture not in released]
    if to_train:
        values = {
            "runs_dir": runs_dir,
            "corpus_dir": config.corpus_dir,
            "mixtures": to_train,
            "stages": ["pretrain", "clt", "locate"],
            **{f"{stage}_device": config.device for stage in ("pretrain", "clt", "locate")},
            **settings["models"],
        }
        run_base_models(config_from_dict(BaseModelsConfig, values))
    outputs = {}
    for mixture in settings["mixtures"]:
        if mixture in released:
            # Claims (b) and (c) read the main model's lens and probes only: on the other releases these
            # sections would cost ≈ 25 min of CPU each at the base scale and be read by nothing.
            is_main = mixture == settings["roles"]["main"]
            outputs[mixture] = adopt_release(config, settings, root, mixture, released[mixture], is_main)
            continue
        base = Path(runs_dir) / mixture
        outputs[mixture] = {
            "model_dir": str(base / "pretrain" / "model"),
            "clt_dir": str(base / "clt" / "clt"),
            "pretrain_summary": str(base / "pretrain" / "summary.json"),
            "clt_summary": str(base / "clt" / "summary.json"),
            "locate_report": str(base / "locate" / "report.json"),
            "locate_dir": str(base / "locate"),
            "located": str(base / "locate" / "located.json"),
        }
    return outputs


def released_models(settings: dict, runs_dir: str) -> dict[str, Path]:
    """{mixture: release} for the mixtures with a release (`settings["releases"]`, a path pattern with
    `{mixture}`) and no finished pretraining run of their own: a model trained here is the original
    (fp32, with its run's summaries), a release the way in for everyone who cloned the repository."""
    pattern = settings.get("releases")
    if not pattern:
        return {}
    found = {}
    for mixture in settings["mixtures"]:
        release = Path(pattern.format(mixture=mixture))
        trained = Path(runs_dir, mixture, "pretrain", "summary.json").exists()
        if (release / "MANIFEST.json").exists() and not trained:
            found[mixture] = release
    return found


def adopt_release(
    config: ReproduceConfig,
    settings: dict,
    root: Path,
    mixture: str,
    release: Path,
    with_location: bool = True,
) -> dict:
    """A released model as the scale's model of `mixture`: its weights, CLT and located units as released
    (the manifest is verified where they load); with `with_location`, of the location report only the sections
    the claims read (lens, probes) are run on it, with the scale's location settings, in
    <root>/released/<mixture>/locate — the release's located.json already holds the rest."""
    from analysis.locate import locate_language
    from training.base_models import BaseModelsConfig

    adopted = {
        "model_dir": str(release / "model"),
        "clt_dir": str(release / "clt"),
        "manifest": str(release / "MANIFEST.json"),
        "located": str(release / "located.json"),
    }
    if not with_location:
        return adopted
    locate_dir = root / "released" / mixture / "locate"
    locate = dataclasses.replace(
        config_from_dict(BaseModelsConfig, settings["models"]).locate,
        run_dir=str(locate_dir),
        model_dir=str(release / "model"),
        clt=str(release / "clt"),
        corpus_dir=config.corpus_dir,
        device=config.device,
        sections=list(CLAIM_SECTIONS),
    )
    locate_language(locate)
    return {**adopted, "locate_report": str(locate_dir / "report.json"), "locate_dir": str(locate_dir)}


def per_model_stage(
    config: ReproduceConfig, settings: dict, root: Path, models: dict, name: str, stage_config, run,
    model_fields, outputs,
) -> dict:  # fmt: skip
    """One run of a stage per model, in <root>/<name>/<mixture>/: `run(stage_config(...))` with the
    model's own fields (`model_fields(paths)`), the corpus, the device and the scale's settings."""
    result = {}
    for mixture, paths in models.items():
        values = per_model_values(config, settings, root, name, mixture, model_fields(paths))
        run(config_from_dict(stage_config, values))
        result[mixture] = {key: str(root / name / mixture / file) for key, file in outputs.items()}
    return result


def per_model_values(
    config: ReproduceConfig, settings: dict, root: Path, name: str, mixture: str, model_fields: dict
) -> dict:
    """The settings of stage `name` run on one model, in <root>/<name>/<mixture>/."""
    return {
        **model_fields,
        "corpus_dir": config.corpus_dir,
        "run_dir": str(root / name / mixture),
        "device": config.device,
        **settings[name],
    }


def overlap_stage(config: ReproduceConfig, settings: dict, root: Path, models: dict) -> dict:
    """Cross-language overlap of pruned-graph features against a shuffled null, on the models claims (a)
    and (e) read (the main model and the one without English)."""
    from attribution.overlap import OverlapConfig, run_overlap

    read = {settings["roles"]["main"], settings["roles"].get("no_english")}
    models = {mixture: paths for mixture, paths in models.items() if mixture in read}
    return per_model_stage(
        config, settings, root, models, "overlap", OverlapConfig, run_overlap,
        lambda paths: {"model_dir": paths["model_dir"], "clt": paths["clt_dir"]},
        {"overlap": "overlap.json", "plot": "overlap.png"},
    )  # fmt: skip


def steer_stage(config: ReproduceConfig, settings: dict, root: Path, models: dict) -> dict:
    """The steering frontier on the main model: features chosen by output effect vs random features of
    the same layers vs the unsteered model and the diff-of-means direction, at equal fluency cost."""
    from interventions.sweep import SteerConfig, run_steering

    paths = models[settings["roles"]["main"]]
    values = {
        "model_dir": paths["model_dir"],
        "clt": paths["clt_dir"],
        "located": paths["located"],
        "corpus_dir": config.corpus_dir,
        "pairs": "all",
        "methods": ["output", "random-output", "diffmean"],
        "decodings": ["greedy"],
        "budgets": [1.0],
        "run_dir": str(root / "steer"),
        "device": config.device,
        **settings["steer"],
    }
    run_steering(config_from_dict(SteerConfig, values))
    return {"summary": str(root / "steer" / "summary.json"), "plot": str(root / "steer" / "frontier.png")}


def linguamap_stage(config: ReproduceConfig, settings: dict, root: Path, models: dict) -> dict:
    """LinguaMap's four scenarios on every model: where its non-English answers fail."""
    from analysis.linguamap_run import LinguaMapConfig, run_linguamap

    return per_model_stage(
        config, settings, root, models, "linguamap", LinguaMapConfig, run_linguamap,
        lambda paths: {"model_dir": paths["model_dir"]}, {"report": "report.json", "plot": "outcomes.png"},
    )  # fmt: skip


def finetune_stage(config: ReproduceConfig, settings: dict, root: Path, models: dict) -> dict:
    """(g): full vs selective vs random-matched fine-tuning of the main model under LinguaMap's protocol."""
    from analysis.linguamap_run import LinguaMapConfig, prepare_finetune_data
    from training.compare import CompareConfig, compare_finetuning

    main, part = settings["roles"]["main"], settings["finetune"]
    paths, data = models[main], root / "finetune" / "data"
    if not (data / "meta.json").exists():  # (written last: the data are complete)
        # The linguamap stage's own run directory and config, so the held-out items are the ones it scored.
        values = per_model_values(
            config, settings, root, "linguamap", main, {"model_dir": paths["model_dir"]}
        )
        values.update(finetune_data=str(data), **part["data"])
        prepare_finetune_data(config_from_dict(LinguaMapConfig, values))
    claim = part["claim"]
    values = {
        "model_dir": paths["model_dir"],
        "located": paths["located"],
        "scenarios": ["linguamap"],
        "variants": ["full", claim["selective"], claim["random"]],
        "linguamap_data": str(data),
        "corpus_dir": config.corpus_dir,
        "run_dir": str(root / "finetune" / "compare"),
        **part["compare"],
    }
    compare_finetuning(config_from_dict(CompareConfig, values))
    return {
        "comparison": str(root / "finetune" / "compare" / "comparison.json"),
        "plot": str(root / "finetune" / "compare" / "comparison.png"),
        **claim,
    }


def diff_stage(config: ReproduceConfig, settings: dict, root: Path, models: dict) -> dict:
    """The main model fully fine-tuned on a weak language, a crosscoder on both models (MLP outputs of
    every layer), and the crosscoder diff report."""
    from analysis.model_diff_report import ModelDiffConfig, run_model_diff
    from clt.crosscoder_train import CrosscoderTrainConfig, train_crosscoder
    from training.finetune import FinetuneConfig, finetune
    from training.models import load_model

    paths, diff = models[settings["roles"]["main"]], settings["diff"]
    base = root / "diff"
    common = {"corpus_dir": config.corpus_dir, "device": config.device}
    finetune(
        config_from_dict(
            FinetuneConfig,
            {"model_dir": paths["model_dir"], "run_dir": str(base / "finetune"), "strategy": "full", **common,
             **diff["finetune"]},
        )
    )  # fmt: skip
    after = str(base / "finetune" / "model")
    n_layers = load_model(paths["model_dir"], "cpu")[0].config.n_layer
    train_crosscoder(
        config_from_dict(
            CrosscoderTrainConfig,
            {"model_a": paths["model_dir"], "model_b": after, "store_a": str(base / "before.zarr"),
             "store_b": str(base / "after.zarr"), "layers": list(range(n_layers)),
             "run_dir": str(base / "crosscoder"), **common, **diff["crosscoder"]},
        )
    )  # fmt: skip
    run_model_diff(
        config_from_dict(
            ModelDiffConfig,
            {"before": paths["model_dir"], "after": after, "clt": paths["clt_dir"], "method": "crosscoder",
             "crosscoder": str(base / "crosscoder"), "run_dir": str(base / "report"), **common,
             **diff["report"]},
        )
    )  # fmt: skip
    return {
        "report": str(base / "report" / "report.json"),
        "plot": str(base / "report" / "relative_norms.png"),
    }


def reproduce(config: ReproduceConfig) -> dict:
    settings = scale_settings(config)
    root = Path(config.run_dir or f"runs/reproduce-{config.scale}")
    unknown = sorted(set(config.stages) - set(STAGES))
    if unknown:
        raise UserError(f"unknown --stages {unknown}; choose from {', '.join(STAGES)}")
    run = RunDir.open(root, config, may_change=("device", "report_dir", "stages"))
    started = time.time()
    corpus = run_stage(run, "corpus", lambda: corpus_stage(config))
    models = run_stage(run, "models", lambda: models_stage(config, settings, root))
    work = {
        "overlap": overlap_stage,
        "steer": steer_stage,
        "linguamap": linguamap_stage,
        "finetune": finetune_stage,
        "diff": diff_stage,
    }
    stages = [corpus, models]
    for name, stage in work.items():
        if name in config.stages:
            stages.append(
                run_stage(run, name, lambda stage=stage: stage(config, settings, root, models.outputs))
            )
    if set(config.stages) != set(work):  # (a subset: another call runs the rest)
        print(f"ran {', '.join(s.name for s in stages)}; the report is written by a call with every stage")
        return {"stages": [{"stage": s.name, "seconds": s.seconds} for s in stages]}
    results = collect_claims(config, settings, {s.name: s.outputs for s in stages})
    results["stages"] = [{"stage": s.name, "seconds": s.seconds} for s in stages]
    results["settings"] = settings
    results["machine"] = machine()
    results["wall_time_this_call_s"] = time.time() - started
    write_reports(config, results)
    return results


def collect_claims(config: ReproduceConfig, settings: dict, outputs: dict) -> dict:
    models, overlap, steer = outputs["models"], outputs["overlap"], outputs["steer"]
    scale_flag = f"--scale {config.scale}"
    command = f"python scripts/reproduce.py {scale_flag}"
    mixtures, roles = settings["mixtures"], settings["roles"]
    main = roles["main"]
    found = [
        claims.shared_middle_layers(Path(overlap[main]["overlap"]), main, "a", command),
        claims.late_language_decoding(Path(models[main]["locate_report"]), main, command),
        claims.early_language_identity(Path(models[main]["locate_report"]), main, command),
    ]
    found[0].plot = overlap[main]["plot"]
    found[1].plot = str(Path(models[main]["locate_dir"]) / "lens.png")
    found[2].plot = str(Path(models[main]["locate_dir"]) / "probes.png")
    steering = claims.steering_swaps_language(Path(steer["summary"]), main, command)
    steering.plot = steer["plot"]
    found.append(steering)
    no_english = roles.get("no_english")
    if no_english in mixtures:
        no_en = claims.shared_middle_layers(Path(overlap[no_english]["overlap"]), no_english, "e", command)
        no_en.claim = f"a model trained without English shares middle-layer features too ({no_english})"
        no_en.plot = overlap[no_english]["plot"]
        found.append(no_en)
    from analysis.linguamap_run import LinguaMapConfig

    langs = settings["linguamap"].get("langs", LinguaMapConfig().langs)
    linguamap_langs = [lang for lang in langs if lang != "en"]
    bottlenecks = claims.linguamap_bottlenecks(
        {m: Path(o["report"]) for m, o in outputs["linguamap"].items()}, linguamap_langs, command
    )
    bottlenecks.plot = outputs["linguamap"][main]["plot"]
    brightening = claims.weak_language_brightens(Path(outputs["diff"]["report"]), main, command)
    brightening.plot = outputs["diff"]["plot"]
    found.append(brightening)
    tuning = outputs["finetune"]
    selective = claims.selective_matches_full(
        Path(tuning["comparison"]), tuning["selective"], tuning["random"], main, command
    )
    selective.plot = tuning["plot"]
    found.append(selective)
    found.append(bottlenecks)
    quality = {
        mixture: claims.released_quality(Path(paths["manifest"]))
        if "manifest" in paths
        else claims.model_quality(Path(paths["pretrain_summary"]), Path(paths["clt_summary"]))
        for mixture, paths in models.items()
    }
    return {
        "scale": config.scale,
        "mixtures": mixtures,
        "claims": [c.to_json() for c in found],
        "quality": {m: {name: n.to_json() for name, n in q.items()} for m, q in quality.items()},
        "_objects": {"claims": found, "quality": quality},  # (dropped before writing JSON)
    }


def machine() -> dict:
    import os

    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fmt(number: Number | None, digits: int = 3) -> str:
    """A number as the report shows it: `digits` decimals, or two significant digits in scientific
    notation for a value that many decimals would show as 0 (a learning rate of 3e-4, a p-value)."""
    if number is None:
        return "—"
    if number.value != 0 and abs(number.value) < 0.5 * 10**-digits:
        return f"{number.value:.1e}"
    return f"{number.value:.{digits}f}"


def markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    """The report; `plots` maps a claim's key to its plot's path relative to the report (shown inline)."""
    found, quality = results["_objects"]["claims"], results["_objects"]["quality"]
    plots = plots or {}
    lines = [
        f"# Results ({results['scale']} scale)",
        "",
        f"Regenerate: `python scripts/reproduce.py --scale {results['scale']}` (finished stages are reused). "
        f"Models trained at this scale: {', '.join(results['mixtures'])}{smaller_than_base(results)}. Every "
        "number below is read from a "
        "stage's output file (`results.json` names the file and the JSON pointer of each); ± is two standard "
        "errors or the distance to a 95% Wilson bound (analysis/claims.py).",
        "",
        "| claim | number | ± | verdict |",
        "|---|---|---|---|",
    ]
    for c in found:
        lines.append(f"| ({c.key}) {c.claim} | {fmt(c.number)} | {fmt(c.uncertainty)} | **{c.verdict}** |")
    lines.append("")
    for c in found:
        lines += [
            f"## ({c.key}) {c.claim}",
            "",
            f"Measure: {c.measure}. Verdict rule: {c.rule}.",
            "",
            "| detail | value |",
            "|---|---|",
            *[f"| {name} | {fmt(value)} |" for name, value in c.details.items()],
            "",
            f"Sources: {', '.join(f'`{s}`' for s in c.sources)}. Command: `{c.command}`.",
            "",
        ]
        if c.key in plots:
            lines += [f"![plot of claim ({c.key})]({plots[c.key]})", "", f"Plot: `{c.plot}`", ""]
        elif c.plot:
            lines += [f"Plot: `{c.plot}`", ""]
    names = list(dict.fromkeys(name for q in quality.values() for name in q))  # (a release may lack one)
    lines += [
        "## The models and their CLTs",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *[f"| {m} | " + " | ".join(fmt(q.get(n)) for n in names) + " |" for m, q in quality.items()],
        "",
        "## Settings of this scale",
        "",
        "Each stage's settings over its config's defaults (`analysis/reproduce.py`'s SCALES, and "
        "`--overrides`):",
        "",
        "```json",
        json.dumps(results["settings"], indent=1),
        "```",
        "",
        "## Machine and wall time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {s['stage']} | {s['seconds']:.0f} |" for s in results["stages"]],
        f"| total | {sum(s['seconds'] for s in results['stages']):.0f} |",
        "",
        ", ".join(f"{k}: {v}" for k, v in results["machine"].items()),
        "",
    ]
    return "\n".join(lines)


def smaller_than_base(results: dict) -> str:
    """What a smaller scale leaves out of the base scale's study (the settings section has the rest)."""
    if results["scale"] == "base":
        return ""
    base = SCALES["base"]
    left_out = [m for m in base["mixtures"] if m not in results["mixtures"]]
    return (
        f" (the base scale also trains {', '.join(left_out)}; this scale's steering, LinguaMap and "
        "fine-tuning settings are smaller: see Settings)"
        if left_out
        else ""
    )


def html_report(results: dict, text: str) -> str:
    """The Markdown report as a page, with each claim's plot inline (base64 PNG)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Results</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px}</style></head><body>",
    ]
    parts.append(f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>")
    for c in results["_objects"]["claims"]:
        if c.plot and Path(c.plot).exists():
            data = base64.b64encode(Path(c.plot).read_bytes()).decode()
            parts.append(f"<h3>({html.escape(c.key)}) {html.escape(c.claim)}</h3>")
            parts.append(f"<img alt='plot of claim {html.escape(c.key)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def copy_plots(results: dict, out: Path, folder: str) -> dict[str, str]:
    """Each claim's plot copied next to the report (the stage directories under runs/ are not committed),
    as {claim key: path relative to the report}."""
    import shutil

    copied = {}
    for c in results["_objects"]["claims"]:
        if c.plot and Path(c.plot).exists():
            target = out / folder / f"claim-{c.key}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(c.plot, target)
            copied[c.key] = f"{folder}/{target.name}"
    return copied


def write_reports(config: ReproduceConfig, results: dict) -> None:
    name = report_name(config.scale)
    out = Path(config.report_dir)
    plots = copy_plots(results, out, f"{name.lower()}-plots")
    text = markdown(results, plots)
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_text(out / f"{name.lower()}.html", html_report(results, text))
    saved = {k: v for k, v in results.items() if k != "_objects"}
    atomic_write_json(out / f"{name.lower()}.json", saved)


def all_numbers(results: dict) -> list[Number]:
    objects = results["_objects"]
    numbers = []
    for c in objects["claims"]:
        numbers += [c.number, *([c.uncertainty] if c.uncertainty is not None else []), *c.details.values()]
    for q in objects["quality"].values():
        numbers += list(q.values())
    return numbers


def verify_all(results: dict) -> list[str]:
    """Every number of the report that is not what its sources hold (empty when all are)."""
    return [
        f"{leaf.source}{leaf.pointer}"
        for number in all_numbers(results)
        if not verify(number)
        for leaf in leaves(number)
    ]
