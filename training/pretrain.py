"""Pretrain a GPT-2-style model (HF `GPT2LMHeadModel`) on a named language mixture.

Stages, each cached in the run directory so a restarted run skips what is done:
1. corpus (built with the default config if missing),
2. tokenizer (byte-level BPE on the mixture itself or on another mixture, e.g. `balanced`),
3. data: mixture sampled to `token_budget` tokens, packed into blocks; validation blocks per language,
4. training: AdamW, warm-up + cosine, clipping, accumulation, optional bf16 autocast, DDP under torchrun,
   checkpoint every `ckpt_every` steps and automatic resume,
5. final evaluation: validation loss per language, language consistency of continuations, plots.

`python scripts/pretrain.py --help` lists every option; `torchrun --nproc-per-node N scripts/pretrain.py`
runs data-parallel (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors.torch import load_file, save_file

from training import evaluate, paths
from training.checkpoint import STATE_FILE, find_checkpoint
from training.config import RunDir, atomic_write_json
from training.corpus.build import CorpusConfig, build_corpus, default_corpus_dir, load_corpus
from training.data import micro_batch_indices, pack_by_language
from training.errors import ConfigMismatch, UserError
from training.loop import (
    Dist,
    OptimizerConfig,
    make_optimizer,
    resume,
    start_run,
    train_steps,
    wsd_decay_start,
)
from training.mixtures import count_chars, parse_mixture, sample_mixture
from training.models import build_model, gpt2_config
from training.tokenizer import count_tokens, fertility, train_bpe_tokenizer


@dataclass
class PretrainConfig(OptimizerConfig):
    """Pretrain a GPT-2-style model on a language mixture of the project's corpus."""

    run_dir: str = field(
        default=paths.PRETRAIN_RUN_DIR, metadata={"help": "run directory (resumed if it holds a checkpoint)"}
    )
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()),
        metadata={"help": "corpus DatasetDict (built with defaults if missing)"},
    )
    mixture: str = field(
        default="en-heavy",
        metadata={"help": "preset (en-heavy, balanced, no-en, en-heavy+eu) or spec like en=0.5,fr=0.5"},
    )
    token_budget: int = field(
        default=500_000, metadata={"help": "distinct training tokens sampled from the corpus"}
    )
    fit_budget: bool = field(
        default=False,
        metadata={
            "help": "if a language of the mixture lacks the text for token_budget, sample the largest budget "
            "the corpus holds at the mixture's shares instead of refusing"
        },
    )
    train_tokens: int = field(
        default=3_000_000, metadata={"help": "tokens processed in training (epochs over the sample)"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides train_tokens"})
    tokenizer_dir: str | None = field(
        default=None, metadata={"help": "use this saved tokenizer instead of training one"}
    )
    tokenizer_mixture: str = field(
        default="same", metadata={"help": "mixture the tokenizer is trained on: 'same' or a preset/spec"}
    )
    tokenizer_chars: int = field(
        default=2_000_000, metadata={"help": "characters sampled to train the tokenizer"}
    )
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size"})
    preset: str = field(default="tiny", metadata={"help": "model size: tiny, small, base, gpt2"})
    n_layer: int | None = field(default=None, metadata={"help": "override the preset's layers"})
    n_embd: int | None = field(default=None, metadata={"help": "override the preset's width"})
    n_head: int | None = field(default=None, metadata={"help": "override the preset's heads"})
    n_ctx: int | None = field(default=None, metadata={"help": "override the preset's context length"})
    dropout: float = field(
        default=0.0, metadata={"help": "dropout (GPT-2 used 0.1; 0 is usual for short runs)"}
    )
    micro_batch: int = field(default=16, metadata={"help": "blocks per forward pass per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    eval_every: int = field(default=200, metadata={"help": "steps between validation-loss evaluations"})
    eval_blocks: int = field(default=32, metadata={"help": "validation blocks per language"})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    gen_prompts: int = field(
        default=50, metadata={"help": "held-out parallel prompts per language for the final consistency eval"}
    )
    gen_prompt_tokens: int = field(default=16, metadata={"help": "prompt length in tokens"})
    gen_new_tokens: int = field(default=32, metadata={"help": "continuation length in tokens"})
    seed: int = field(default=0, metadata={"help": "seed for init, mixture sampling and data order"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    pause_at_step: int | None = field(
        default=None,
        metadata={"help": "stop (checkpointed) after this step, the schedule still spanning the whole run"},
    )
    branch_from: str | None = field(
        default=None,
        metadata={
            "help": "a WSD run (same config, more steps) paused at this run's decay start: continue from its "
            "checkpoint and decay here — how a longer run is read at a shorter budget"
        },
    )


# Fields a resumed run may change: pausing earlier or later does not change what the run computes, and
# fit_budget only chooses between refusing and fitting a budget the corpus cannot supply (a run that
# started has its data sampled already).
MAY_CHANGE = ("device", "pause_at_step", "fit_budget")


# ---------------------------------------------------------------------------------------------
# Preparation: tokenizer and packed data (rank 0 writes, the others read)
# ---------------------------------------------------------------------------------------------


def train_mixture_tokenizer(corpus, spec: str, chars: int, vocab_size: int, seed: int):
    """A byte-level BPE trained on `chars` characters of the corpus's train split in mixture `spec`."""
    train = corpus["train"]
    texts, langs = list(train["text"]), list(train["lang"])
    sample = sample_mixture(
        texts, langs, parse_mixture(spec), chars, count_chars, seed=seed, unit_name="characters"
    )
    return train_bpe_tokenizer([texts[i] for i in sample.indices], vocab_size=vocab_size)


def saved_mixture_tokenizer(path: Path, corpus, spec: str, chars: int, vocab_size: int, seed: int) -> Path:
    """`train_mixture_tokenizer` once, saved at `path` (atomically: a half-written tokenizer never loads);
    returns `path`. Runs that must share one vocabulary point `--tokenizer-dir` at it."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        staging = path.with_name(path.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        train_mixture_tokenizer(corpus, spec, chars, vocab_size, seed).save_pretrained(staging)
        staging.rename(path)
    return path


def prepare_tokenizer(config: PretrainConfig, corpus, run: RunDir):
    from transformers import AutoTokenizer

    model_dir = run.path / "model"
    if (model_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(model_dir)
    if config.tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir)
    else:
        spec = config.mixture if config.tokenizer_mixture == "same" else config.tokenizer_mixture
        tokenizer = train_mixture_tokenizer(
            corpus, spec, config.tokenizer_chars, config.vocab_size, config.seed
        )
    tokenizer.save_pretrained(model_dir)
    return tokenizer


def fork_branch(config: PretrainConfig, run: RunDir) -> None:
    """Start a WSD decay branch in `run`: copy the tokenizer, the packed data, the metrics so far and the
    checkpoint of `config.branch_from`, which must hold this run's config with more steps, paused exactly
    where this run's decay starts. Until the checkpoint is copied (last) the fork is simply redone."""
    if find_checkpoint(run.path) is not None:
        return
    source = Path(config.branch_from)
    if config.schedule != "wsd" or config.max_steps is None:
        raise UserError("--branch-from needs --schedule wsd and --max-steps (the branch's total steps)")
    if not (source / "config.json").exists():
        raise UserError(f"--branch-from {source}: no pretraining run there")
    allowed = ("device", "pause_at_step", "branch_from", "run_dir", "max_steps")
    try:
        RunDir(source).check_config(config, may_change=allowed)
    except ConfigMismatch as error:
        raise UserError(f"--branch-from: {error}".split("; use another")[0]) from None
    fork_step = wsd_decay_start(config.max_steps, config)
    checkpoint = find_checkpoint(source)
    source_step = None if checkpoint is None else json.loads((checkpoint / STATE_FILE).read_text())["step"]
    if source_step != fork_step:
        at = "has no checkpoint" if source_step is None else f"is at step {source_step}"
        raise UserError(
            f"--branch-from {source} {at}, but a {config.max_steps}-step branch forks "
            f"at step {fork_step}: run it with --pause-at-step {fork_step} first"
        )
    (run.path / "model").mkdir(parents=True, exist_ok=True)
    for tokenizer_file in (source / "model").glob("*.json"):
        if tokenizer_file.name != "config.json":
            shutil.copy2(tokenizer_file, run.path / "model" / tokenizer_file.name)
    shutil.copytree(source / "data", run.path / "data", dirs_exist_ok=True)
    # The source's records past the fork belong to its longer schedule, not to this branch.
    history = [r for r in RunDir(source).read_metrics() if r["step"] <= fork_step]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    partial = run.path / "checkpoint.fork"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(checkpoint, partial)
    partial.rename(run.path / "checkpoint")


def prepare_data(config: PretrainConfig, corpus, tokenizer, n_ctx: int, run: RunDir) -> dict:
    """Sample the mixture, tokenise, pack; cache blocks in `data/blocks.safetensors` + `data/meta.json`."""
    data_dir = run.path / "data"
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    texts, langs = list(corpus["train"]["text"]), list(corpus["train"]["lang"])
    if getattr(config, "linguamap_data", ""):  # fine-tuning on the protocol's own training texts
        rows = [
            json.loads(line)
            for line in (Path(config.linguamap_data) / "train.jsonl").read_text().splitlines()
        ]
        texts, langs = [r["text"] for r in rows], [r["lang"] for r in rows]
    mixture = parse_mixture(config.mixture)
    sample = sample_mixture(
        texts,
        langs,
        mixture,
        config.token_budget,
        count_tokens(tokenizer),
        seed=config.seed,
        fit=getattr(config, "fit_budget", False),
    )
    if sample.budget != config.token_budget:
        print(
            f"token budget fitted to the corpus: {sample.budget:,} distinct tokens instead of "
            f"{config.token_budget:,} (at the mixture's shares)"
        )
    token_lists = tokenizer([texts[i] for i in sample.indices], add_special_tokens=False)["input_ids"]
    train_blocks, block_langs = pack_by_language(
        token_lists, [langs[i] for i in sample.indices], tokenizer.eos_token_id, n_ctx
    )

    # Validation blocks for every corpus language, also those outside the mixture (e.g. held-out Basque).
    val_texts, val_langs = list(corpus["validation"]["text"]), list(corpus["validation"]["lang"])
    val_ids = tokenizer(val_texts, add_special_tokens=False)["input_ids"]
    val_tensors = {}
    for lang in sorted(set(val_langs)):
        ids = [t for t, l in zip(val_ids, val_langs) if l == lang]
        blocks, _ = pack_by_language(ids, [lang] * len(ids), tokenizer.eos_token_id, n_ctx)
        val_tensors[f"val/{lang}"] = blocks[: config.eval_blocks].contiguous()

    data_dir.mkdir(parents=True, exist_ok=True)
    save_file({"train": train_blocks, **val_tensors}, str(data_dir / "blocks.safetensors"))
    meta = {
        "mixture": mixture,
        "tokens_per_language": sample.units,
        "token_budget_used": sample.budget,
        "blocks": len(train_blocks),
        "block_langs": block_langs,
        "fertility_on_validation": fertility(tokenizer, val_texts, val_langs),
    }
    atomic_write_json(meta_path, meta)  # written last: its presence means the data is complete
    return meta


def load_data(
    config, corpus, tokenizer, n_ctx: int, run: RunDir, world: Dist
) -> tuple[dict, torch.Tensor, dict]:
    """Rank 0 prepares (or finds) the run's packed data, every rank then reads it:
    returns (meta, train blocks, validation blocks by language)."""
    if world.is_main:
        meta = prepare_data(config, corpus, tokenizer, n_ctx, run)
    world.barrier()
    if not world.is_main:
        meta = json.loads((run.path / "data" / "meta.json").read_text())
    tensors = load_file(str(run.path / "data" / "blocks.safetensors"))
    train_blocks = tensors.pop("train")
    return meta, train_blocks, {name.split("/", 1)[1]: blocks for name, blocks in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def model_config_for(config: PretrainConfig, vocab_size: int, bos_token_id: int, eos_token_id: int):
    """The GPT2Config of a run: its preset, with the run's overrides of shape, context and dropout."""
    return gpt2_config(
        config.preset,
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dropout=config.dropout,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_ctx=config.n_ctx,
    )


def time_bare_steps(
    model_config, blocks: Int[torch.Tensor, "blocks ctx"], config: PretrainConfig, steps: int, warmup: int = 0
) -> float:
    """Seconds for `steps` bare optimizer steps (forward, backward, AdamW; nothing else) of a fresh model
    on `config.micro_batch` blocks per step, after `warmup` untimed steps: the reference throughput the
    project loop is benchmarked against, and the clock a scaling sweep converts minutes with."""
    model = build_model(model_config, config.seed)
    optimizer = make_optimizer(model, config)
    model.train()
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        (indices,) = micro_batch_indices(step, config.micro_batch, 1, 0, 1, len(blocks), config.seed)
        batch = blocks[indices].long()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def total_steps_for(config: PretrainConfig, n_ctx: int, world_size: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    tokens_per_step = config.micro_batch * config.grad_accum * world_size * n_ctx
    return max(1, config.train_tokens // tokens_per_step)


def pretrain(config: PretrainConfig) -> dict:
    """Run (or resume, or just report) a pretraining run; returns the final summary."""
    world, device, run, finished = start_run(config, may_change=MAY_CHANGE)
    if finished is not None:
        return finished

    if world.is_main:
        if config.branch_from:
            fork_branch(config, run)
        corpus = (
            build_corpus(CorpusConfig(corpus_dir=config.corpus_dir))
            if not Path(config.corpus_dir, "dataset_dict.json").exists()
            else load_corpus(config.corpus_dir)
        )
        tokenizer = prepare_tokenizer(config, corpus, run)
    world.barrier()
    if not world.is_main:
        corpus = load_corpus(config.corpus_dir)
        tokenizer = prepare_tokenizer(config, corpus, run)

    model_config = model_config_for(config, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    n_ctx = model_config.n_positions
    meta, train_blocks, val_blocks = load_data(config, corpus, tokenizer, n_ctx, run, world)

    model = build_model(model_config, config.seed).to(device)
    optimizer = make_optimizer(model, config)
    state = resume(run, model, optimizer, world)
    total_steps = total_steps_for(config, n_ctx, world.world_size)
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
        total_steps,
        desc="pretrain",
        stop_at=config.pause_at_step,
    )
    world.shutdown()
    if state["step"] < total_steps:
        return {"run_dir": str(run.path), "paused_at_step": state["step"], "total_steps": total_steps}

    summary = None
    if world.is_main:
        summary = finish(config, run, model, tokenizer, corpus, val_blocks, meta, state, device)
    return summary if summary is not None else {}


def finish(
    config: PretrainConfig, run: RunDir, model, tokenizer, corpus, val_blocks, meta, state, device
) -> dict:
    """Save the model, evaluate validation loss and continuation consistency, plot, write summary.json."""
    from training.plots import plot_loss_curves

    model_dir = run.path / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    val_loss = evaluate.loss_per_language(model, val_blocks, config.micro_batch, device)
    # Tokenizer-independent: comparable across models with different tokenizers (at most 300 paragraphs).
    validation = corpus["validation"]
    nats_per_char = {
        lang: evaluate.nats_per_char(
            model,
            tokenizer,
            [t for t, l in zip(validation["text"], validation["lang"]) if l == lang][:300],
            model.config.n_positions,
            device,
        )
        for lang in sorted(val_loss)
    }

    parallel = corpus["parallel"]
    texts, langs = evaluate.usable_prompts(
        tokenizer,
        list(parallel["text"]),
        list(parallel["lang"]),
        config.gen_prompt_tokens,
        config.gen_prompts,
    )
    consistency, records = {}, []
    for greedy in (True, False):
        report, rows = evaluate.continuation_consistency(
            model,
            tokenizer,
            texts,
            langs,
            config.gen_prompt_tokens,
            config.gen_new_tokens,
            greedy,
            device,
            seed=config.seed,
        )
        consistency["greedy" if greedy else "sampled"] = report
        records += rows
    (run.path / "generations.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    plot_loss_curves(
        run.read_metrics(), run.path / "loss_curves.png", title=f"{config.preset} · {config.mixture}"
    )
    train_records = [r for r in run.read_metrics() if r["split"] == "train"]
    steady = [r["tokens_per_s"] for r in train_records[1:]] or [r["tokens_per_s"] for r in train_records]
    summary = {
        "run_dir": str(run.path),
        "mixture": meta["mixture"],
        "tokens_per_language_sampled": meta["tokens_per_language"],
        "fertility_on_validation": meta["fertility_on_validation"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": state["step"],
        "tokens_trained": state["tokens"],
        "train_time_s": state["train_time_s"],
        "wall_time_s": state["wall_time_s"],
        "tokens_per_s_median": sorted(steady)[len(steady) // 2] if steady else None,
        "validation_loss": val_loss,
        "validation_nats_per_char": nats_per_char,
        "language_consistency": consistency,
    }
    atomic_write_json(run.path / "summary.json", summary)
    return summary


@dataclass
class SummarizeConfig:
    """Markdown tables comparing finished pretraining runs."""

    runs: list[str] = field(
        default_factory=lambda: [paths.PRETRAIN_RUN_DIR],
        metadata={"help": "finished pretraining run directories (comma-separated)"},
    )


def summarize_runs(run_dirs: list[str]) -> str:
    """Markdown tables comparing pretraining runs, from their summary.json files."""
    out: list[str] = []
    summaries = {Path(d).name: json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs}
    names = list(summaries)
    langs = sorted({lang for s in summaries.values() for lang in s["validation_loss"]})
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    rows = [
        ("parameters", lambda s: f"{s['parameters']:,}"),
        ("distinct tokens sampled", lambda s: f"{sum(s['tokens_per_language_sampled'].values()):,}"),
        ("tokens trained", lambda s: f"{s['tokens_trained']:,}"),
        ("steps", lambda s: f"{s['steps']:,}"),
        ("median tokens/s (training steps)", lambda s: f"{s['tokens_per_s_median']:,.0f}"),
        ("wall time (s)", lambda s: f"{s['wall_time_s']:,.0f}"),
    ]
    out.append("### Runs\n\n" + header)
    for label, fn in rows:
        out.append(f"| {label} | " + " | ".join(fn(summaries[n]) for n in names) + " |")
    out.append("\n### Tokens sampled per language\n\n" + header)
    for lang in langs:
        out.append(
            f"| {lang} | "
            + " | ".join(f"{summaries[n]['tokens_per_language_sampled'].get(lang, 0):,}" for n in names)
            + " |"
        )
    out.append("\n### Validation loss per language (nats/token; each model's own tokenizer)\n\n" + header)
    for lang in langs:
        out.append(
            f"| {lang} | " + " | ".join(f"{summaries[n]['validation_loss'][lang]:.3f}" for n in names) + " |"
        )
    out.append("\n### Tokenizer fertility on the validation split\n\n" + header)
    for lang in langs:
        cells = [summaries[n]["fertility_on_validation"][lang] for n in names]
        out.append(
            f"| {lang} ({cells[0]['fertility_unit']}) | "
            + " | ".join(f"{c['fertility']:.3f}" for c in cells)
            + " |"
        )
    for mode in ("greedy", "sampled"):
        out.append(
            f"\n### Language consistency of {mode} continuations (share in the prompt's language; "
            "unknown)\n\n" + header
        )
        for lang in langs:
            cells = [summaries[n]["language_consistency"][mode][lang] for n in names]
            out.append(
                f"| {lang} | "
                + " | ".join(f"{c['consistent']:.2f} ({c['unknown']:.2f}) n={c['n']}" for c in cells)
                + " |"
            )
    return "\n".join(out)
