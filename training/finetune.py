"""Selective fine-tuning of a pretrained model, with the pretraining loop (`training/loop.py`).

A run loads a `save_pretrained` model, picks the trainable parameters with a strategy
(`training/selection.py`, or LoRA adapters via peft), samples a scenario's language mixture from the
corpus, trains, and writes `model/` (a plain HF directory; LoRA merged), `before.json` / `summary.json`
(validation loss per language, continuation consistency of the target languages, trainable share,
wall time), `config.json` (scenario resolved) and `metrics.jsonl`. Runs resume from their checkpoint.

Scenarios (named configs, `--scenario NAME`; any field can still be overridden):
- `adapt-eu` (CogSym, LAPE fine-tuning): adapt the English-heavy model to Basque, which it never saw. Target
  metric: Basque validation loss; forgetting: mean loss increase on the pretraining languages.
- `consistency` (LinguaMap): train on the non-English languages so that continuations stay in the
  prompt's language instead of drifting to English. Target metric: share of greedy continuations that
  CLD2 assigns to the prompt's language; forgetting: loss increase on English.
- `linguamap` (LinguaMap's protocol, analysis/linguamap.py): train on UI-term cloze prompts of the
  protocol's scenarios 2–4 with the answer in the expected language, made from help pages that hold no
  held-out paragraph (`--linguamap-data DIR`, written by `scripts/linguamap.py --finetune-data DIR`).
  Target metric: language consistency of the greedy answers (correct or wrong but in the expected
  language) over scenarios 2–4 at 3 shots on the test items; the validation items choose the learning
  rate (training/compare.py); accuracy (likelihood ranking) is reported next to it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import evaluate, paths
from training import selection as select
from training.config import RunDir, atomic_write_json
from training.corpus.build import default_corpus_dir, load_corpus
from training.errors import UserError
from training.loop import OptimizerConfig, make_optimizer, resume, start_run, train_steps
from training.lora import add_lora, lora_count, merge_lora
from training.models import load_model
from training.pretrain import load_data


@dataclass(frozen=True)
class Scenario:
    mixture: str
    target_langs: tuple[str, ...]
    retain_langs: tuple[str, ...]  # languages whose loss increase counts as forgetting
    metric: str  # "target_loss" (lower is better) or "consistency" (higher is better)


SCENARIOS = {
    "adapt-eu": Scenario("eu=1.0", ("eu",), ("en", "fr", "de", "es", "ru", "zh"), "target_loss"),
    "consistency": Scenario(
        "fr=0.2,de=0.2,es=0.2,ru=0.2,zh=0.2", ("fr", "de", "es", "ru", "zh"), ("en",), "consistency"
    ),
    "linguamap": Scenario(
        "fr=0.2,de=0.2,es=0.2,ru=0.2,zh=0.2", ("fr", "de", "es", "ru", "zh"), ("en",), "linguamap"
    ),
}


@dataclass
class FinetuneConfig(OptimizerConfig):
    """Fine-tune a pretrained model on a scenario with a parameter-selection strategy."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "pretrained HF model directory"})
    run_dir: str = field(
        default="runs/finetune/adapt-eu-lape-0",
        metadata={"help": "run directory (resumed if it holds a checkpoint)"},
    )
    scenario: str = field(default="adapt-eu", metadata={"help": f"named scenario: {', '.join(SCENARIOS)}"})
    strategy: str = field(
        default="lape", metadata={"help": f"parameter selection: {', '.join(select.STRATEGIES)}"}
    )
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()), metadata={"help": "corpus DatasetDict"}
    )
    located: str = field(
        default=paths.LOCATED_WITH_EU,
        metadata={"help": "located-units file (lape, located, random of those)"},
    )
    last_k: int = field(default=1, metadata={"help": "last-k: number of final blocks"})
    outermost_share: float = field(
        default=0.25, metadata={"help": "outermost: share of blocks, split first/last"}
    )
    lape_units: str = field(
        default="neurons_5pct",
        metadata={"help": "lape: 'neurons_5pct' or 'neurons' (top 1%: none for eu on the tiny model)"},
    )
    located_units: str = field(
        default="feature_aligned_neurons",
        metadata={"help": "located: 'feature_aligned_neurons' or 'feature_layers'"},
    )
    random_reference: str = field(
        default="lape", metadata={"help": "random: the strategy whose kind and size it matches"}
    )
    train_embeddings: bool = field(
        default=False, metadata={"help": "also train wte (tied with the LM head) and wpe"}
    )
    lora_rank: int = field(default=8, metadata={"help": "lora: adapter rank"})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "lora: scaling numerator (scale = alpha / rank)"}
    )
    mixture: str = field(default="", metadata={"help": "training mixture ('' = the scenario's)"})
    linguamap_data: str = field(
        default="",
        metadata={"help": "linguamap scenario: directory from scripts/linguamap.py --finetune-data"},
    )
    linguamap_items: int = field(
        default=100, metadata={"help": "linguamap scenario: validation / test items evaluated per cell"}
    )
    target_langs: list[str] = field(
        default_factory=list, metadata={"help": "target languages ('' = the scenario's)"}
    )
    token_budget: int = field(
        default=200_000, metadata={"help": "distinct fine-tuning tokens sampled from the corpus"}
    )
    max_steps: int = field(default=150, metadata={"help": "optimizer steps"})
    micro_batch: int = field(default=8, metadata={"help": "blocks per forward pass per process"})
    n_ctx: int = field(
        default=0,
        metadata={
            "help": "block length of training and validation-loss blocks in tokens (0 = the model's "
            "context; shorter blocks suit short texts such as LinguaMap's cloze prompts)"
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int = field(default=15, metadata={"help": "linear warm-up steps"})
    eval_every: int = field(default=50, metadata={"help": "steps between validation-loss evaluations"})
    eval_blocks: int = field(default=32, metadata={"help": "validation blocks per language"})
    ckpt_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    gen_prompts: int = field(default=40, metadata={"help": "held-out parallel prompts per target language"})
    gen_prompt_tokens: int = field(default=16, metadata={"help": "prompt length in tokens"})
    gen_new_tokens: int = field(default=32, metadata={"help": "continuation length in tokens"})
    seed: int = field(
        default=0, metadata={"help": "seed for data sample and order, random subsets and LoRA init"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})


def resolve(config: FinetuneConfig) -> FinetuneConfig:
    """Fill the scenario's mixture and target languages, and check the choices early."""
    if config.scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {config.scenario!r}; choose one of {sorted(SCENARIOS)}")
    if config.strategy not in select.STRATEGIES:
        raise UserError(f"unknown strategy {config.strategy!r}; choose one of {select.STRATEGIES}")
    if config.strategy == "random" and config.random_reference in ("random", "full", "lora"):
        raise UserError(f"random must match a layer or neuron strategy, not {config.random_reference!r}")
    scenario = SCENARIOS[config.scenario]
    if scenario.metric == "linguamap" and not (Path(config.linguamap_data) / "train.jsonl").exists():
        raise UserError(
            "the linguamap scenario needs --linguamap-data DIR with train.jsonl (write it with "
            "scripts/linguamap.py --finetune-data DIR)"
        )
    # Target languages chosen without a mixture train on those languages in equal parts.
    chosen = list(config.target_langs)
    own_mixture = ",".join(f"{lang}={1 / len(chosen):g}" for lang in chosen) if chosen else ""
    return dataclasses.replace(
        config,
        mixture=config.mixture or own_mixture or scenario.mixture,
        target_langs=chosen or list(scenario.target_langs),
    )


# ---------------------------------------------------------------------------------------------
# Parameter selection
# ---------------------------------------------------------------------------------------------


def _located_units(config: FinetuneConfig, model, key: str) -> list:
    from analysis.located import load_located

    doc = load_located(config.located, model=model, model_dir=config.model_dir)
    missing = [lang for lang in config.target_langs if lang not in doc["langs"]]
    if missing:
        raise ValueError(
            f"{config.located} has no units for {missing}: run scripts/locate_language.py with "
            f"--langs including them (and --run-dir elsewhere), then pass --located"
        )
    if key == "feature_layers":
        # The layer holding most of each target language's identity features.
        return sorted(
            {
                doc["layers"]["language_features"][lang][0]
                for lang in config.target_langs
                if doc["layers"]["language_features"].get(lang)
            }
        )
    if key not in doc:
        raise ValueError(
            f"{config.located} has no {key!r} units (known: neurons, neurons_5pct, feature_aligned_neurons)"
        )
    return [tuple(unit) for lang in config.target_langs for unit in doc[key].get(lang, [])]


def build_selection(config: FinetuneConfig, model, strategy: str | None = None) -> select.Selection:
    """The `Selection` of a (non-LoRA) strategy; `random` is built from its reference strategy."""
    strategy = strategy or config.strategy
    if strategy == "full":
        return select.full(model)
    if strategy == "embeddings":
        return select.embeddings(model)
    if strategy == "last-k":
        chosen = select.last_k(model, config.last_k)
    elif strategy == "outermost":
        chosen = select.outermost(model, config.outermost_share)
    elif strategy == "lape":
        chosen = select.neurons(model, _located_units(config, model, config.lape_units), "lape")
    elif strategy == "located":
        units = _located_units(config, model, config.located_units)
        if config.located_units == "feature_layers":
            chosen = select.blocks(model, units, "located")
        else:
            chosen = select.neurons(model, units, "located")
    elif strategy == "random":
        chosen = select.random_like(
            model, build_selection(config, model, config.random_reference), config.seed
        )
    else:
        raise ValueError(f"no parameter selection for strategy {strategy!r}")
    return select.with_embeddings(model, chosen) if config.train_embeddings else chosen


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_model(
    model, tokenizer, corpus, val_blocks: dict, config: FinetuneConfig, device: torch.device
) -> dict:
    """Validation loss per language and greedy continuation consistency of the target languages."""
    losses = evaluate.loss_per_language(model, val_blocks, config.micro_batch, device)
    parallel = corpus["parallel"]
    texts, langs = list(parallel["text"]), list(parallel["lang"])
    keep = [i for i, lang in enumerate(langs) if lang in config.target_langs]
    texts, langs = evaluate.usable_prompts(
        tokenizer,
        [texts[i] for i in keep],
        [langs[i] for i in keep],
        config.gen_prompt_tokens,
        config.gen_prompts,
    )
    consistency, records = evaluate.continuation_consistency(
        model,
        tokenizer,
        texts,
        langs,
        config.gen_prompt_tokens,
        config.gen_new_tokens,
        greedy=True,
        device=device,
        seed=config.seed,
    )
    result = {"loss": losses, "consistency": consistency, "generations": records}
    if SCENARIOS[config.scenario].metric == "linguamap":
        result["linguamap"] = linguamap_cells(model, tokenizer, config)
    return result


LINGUAMAP_SHOTS = 3


def linguamap_cells(model, tokenizer, config: FinetuneConfig) -> dict:
    """Scenarios 2–4 × target languages at 3 shots, both scorings, on the validation and test items."""
    import random

    from analysis import linguamap as lm
    from analysis.linguamap_run import evaluate_cell, scenario_prompts

    out = {}
    for split in ("validation", "test"):
        lines = (Path(config.linguamap_data) / f"{split}.jsonl").read_text().splitlines()
        items = [lm.ClozeItem.from_json(json.loads(line)) for line in lines]
        items = random.Random(0).sample(items, min(config.linguamap_items, len(items)))
        cells = []
        for scenario in ("2", "3", "4"):
            for lang in config.target_langs:
                prompts = scenario_prompts(items, scenario, lang, LINGUAMAP_SHOTS, seed=0)
                for mode in ("generation", "likelihood"):
                    result = evaluate_cell(model, tokenizer, prompts, mode, 12)
                    result.pop("examples")
                    cells.append({"scenario": scenario, "lang": lang, "mode": mode, **result})
        out[split] = cells
    return out


def linguamap_summary(cells: list[dict]) -> dict:
    """Means over cells: language consistency and accuracy (generation), accuracy (likelihood), and
    the four outcome shares of each scoring."""
    from analysis.linguamap import OUTCOMES

    summary = {}
    for mode in ("generation", "likelihood"):
        mine = [c for c in cells if c["mode"] == mode and c["n"] > 0]
        summary[mode] = {o: sum(c[o] for c in mine) / max(1, len(mine)) for o in OUTCOMES}
    generation = summary["generation"]
    summary["consistency"] = generation["correct"] + generation["wrong_expected_language"]
    return summary


def scores(before: dict, after: dict, config: FinetuneConfig) -> dict:
    """The comparison table's numbers: target metric before/after and forgetting."""
    scenario = SCENARIOS[config.scenario]

    def target(result: dict, split: str = "test") -> float:
        if scenario.metric == "linguamap":
            return linguamap_summary(result["linguamap"][split])["consistency"]
        if scenario.metric == "target_loss":
            return sum(result["loss"][lang] for lang in config.target_langs) / len(config.target_langs)
        return sum(result["consistency"][lang]["consistent"] for lang in config.target_langs) / len(
            config.target_langs
        )

    retained = [lang for lang in scenario.retain_langs if lang in after["loss"]]
    forgetting = sum(after["loss"][lang] - before["loss"][lang] for lang in retained) / len(retained)
    out = {
        "metric": scenario.metric,
        "target_before": target(before),
        "target_after": target(after),
        "forgetting": forgetting,
        "forgetting_langs": retained,
    }
    if scenario.metric == "linguamap":
        out["validation_before"], out["validation_after"] = (
            target(before, "validation"),
            target(after, "validation"),
        )
        out["linguamap_before"] = linguamap_summary(before["linguamap"]["test"])
        out["linguamap_after"] = linguamap_summary(after["linguamap"]["test"])
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def block_length(config: FinetuneConfig, context: int) -> int:
    if config.n_ctx < 0 or config.n_ctx > context:
        raise UserError(f"--n-ctx {config.n_ctx} must be between 1 and the model's context of {context}")
    return config.n_ctx or context


def finetune(config: FinetuneConfig) -> dict:
    """Run (or resume, or just report) a fine-tuning run; returns the summary."""
    started = time.perf_counter()
    config = resolve(config)
    world, device, run, finished = start_run(config)
    if finished is not None:
        return finished
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model_dir, device)
    # Chosen before anything slow, so an impossible selection (e.g. no located units) fails at once.
    selection = None if config.strategy == "lora" else build_selection(config, model)
    corpus = load_corpus(config.corpus_dir)
    n_ctx = block_length(config, model.config.n_positions)
    meta, train_blocks, val_blocks = load_data(config, corpus, tokenizer, n_ctx, run, world)

    before_path = run.path / "before.json"
    if world.is_main and not before_path.exists():
        atomic_write_json(before_path, evaluate_model(model, tokenizer, corpus, val_blocks, config, device))

    masked = None
    if config.strategy == "lora":
        model = add_lora(model, config.lora_rank, config.lora_alpha, seed=config.seed)
        counts, chosen = (
            lora_count(model),
            {"strategy": "lora", "rank": config.lora_rank, "alpha": config.lora_alpha},
        )
    else:
        masked = select.MaskedTraining(model, selection)
        counts, chosen = select.count(model, selection), selection.describe()
    optimizer = make_optimizer(model, config)
    state = resume(run, model, optimizer, world)
    state = train_steps(
        model,
        optimizer,
        train_blocks,
        val_blocks,
        config,
        run,
        world,
        device,
        state,
        config.max_steps,
        desc=f"finetune {config.strategy}",
        after_step=masked.restore if masked else None,
    )
    world.shutdown()
    if not world.is_main:
        return {}
    if masked is not None:
        masked.remove()
    else:
        model = merge_lora(model)
    return finish(
        config, run, model, tokenizer, corpus, val_blocks, meta, state, counts, chosen, device, started
    )


def finish(
    config: FinetuneConfig,
    run: RunDir,
    model,
    tokenizer,
    corpus,
    val_blocks,
    meta,
    state,
    counts,
    chosen,
    device,
    started: float,
) -> dict:
    model.save_pretrained(run.path / "model", safe_serialization=True)
    tokenizer.save_pretrained(run.path / "model")
    before = json.loads((run.path / "before.json").read_text())
    after = evaluate_model(model, tokenizer, corpus, val_blocks, config, device)
    with open(run.path / "generations.jsonl", "w") as handle:
        for when, result in (("before", before), ("after", after)):
            for record in result.pop("generations"):
                handle.write(json.dumps({"when": when, **record}, ensure_ascii=False) + "\n")
    summary = {
        "run_dir": str(run.path),
        "scenario": config.scenario,
        "strategy": config.strategy,
        "seed": config.seed,
        "model_dir": config.model_dir,
        "mixture": meta["mixture"],
        "target_langs": config.target_langs,
        "selection": chosen,
        "parameters": counts,
        **scores(before, after, config),
        "before": before,
        "after": after,
        "steps": state["step"],
        "tokens_trained": state["tokens"],
        "train_time_s": state["train_time_s"],
        "run_time_s": time.perf_counter() - started,
    }
    atomic_write_json(run.path / "summary.json", summary)
    return summary
