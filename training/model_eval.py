"""Models side by side on the same held-out text: nats per character (tokenizer-independent), and
greedy and sampled continuations of the *same* prompt texts — language consistency (CLD2) and the share
of distinct tokens — with a table of sample continuations per language.

Prompts are the first characters of held-out parallel paragraphs (cut at a word boundary; 24 characters
for Chinese and Japanese, which have no spaces), so models with different tokenizers see the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from training import evaluate
from training.config import RunDir, atomic_write_json
from training.corpus.build import default_corpus_dir, load_corpus, require_langs
from training.corpus.cleaning import UNSPACED
from training.errors import UserError


@dataclass
class ModelEvalConfig:
    """Evaluate models side by side on the same held-out text (nats/char, continuations, samples)."""

    model_dirs: list[str] = field(default_factory=list, metadata={"help": "model directories"})
    names: list[str] = field(default_factory=list, metadata={"help": "their names (default: folder names)"})
    corpus_dir: str = field(
        default_factory=lambda: str(default_corpus_dir()),
        metadata={"help": "corpus with the held-out splits"},
    )
    run_dir: str = field(default="runs/model-eval", metadata={"help": "run directory"})
    langs: list[str] = field(
        default_factory=list, metadata={"help": "languages (default: every language of the parallel split)"}
    )
    prompts_per_lang: int = field(default=50, metadata={"help": "held-out prompts per language"})
    prompt_chars: int = field(default=64, metadata={"help": "prompt length in characters (zh/ja: 24)"})
    new_tokens: int = field(default=32, metadata={"help": "continuation length in tokens"})
    nats_paragraphs: int = field(default=300, metadata={"help": "validation paragraphs per language"})
    samples_per_lang: int = field(default=3, metadata={"help": "sample rows per language in the table"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})


def cut_prompt(text: str, lang: str, chars: int) -> str:
    """The first `chars` characters, cut back to the last space (not for zh/ja, cut at 24)."""
    if lang in UNSPACED:
        return text[:24]
    head = text[:chars]
    if len(text) > chars and " " in head[chars // 2 :]:
        head = head[: head.rindex(" ")]
    return head.rstrip()


def prompts_for(corpus, langs: list[str], per_lang: int, chars: int) -> tuple[list[str], list[str]]:
    parallel = corpus["parallel"]
    texts, prompt_langs, taken = [], [], dict.fromkeys(langs, 0)
    for text, lang in zip(parallel["text"], parallel["lang"]):
        if lang in taken and taken[lang] < per_lang and len(text) > chars:
            texts.append(cut_prompt(text, lang, chars))
            prompt_langs.append(lang)
            taken[lang] += 1
    return texts, prompt_langs


def evaluate_model(config: ModelEvalConfig, model_dir: str, corpus, langs, prompts, prompt_langs) -> dict:
    from training.models import load_model

    model, tokenizer = load_model(model_dir, config.device)
    device = next(model.parameters()).device
    validation = corpus["validation"]
    nats = {
        lang: evaluate.nats_per_char(
            model,
            tokenizer,
            [t for t, l in zip(validation["text"], validation["lang"]) if l == lang][
                : config.nats_paragraphs
            ],
            model.config.n_positions,
            device,
        )
        for lang in langs
    }
    record = {"model_dir": model_dir, "nats_per_char": nats, "continuations": {}}
    for mode in ("greedy", "sampled"):
        report, rows = evaluate.continuation_consistency(
            model,
            tokenizer,
            prompts,
            prompt_langs,
            None,
            config.new_tokens,
            mode == "greedy",
            device,
            config.seed,
        )
        record[mode] = report
        record["continuations"][mode] = [row["continuation"] for row in rows]
    return record


def run_model_eval(config: ModelEvalConfig) -> dict:
    if not config.model_dirs:
        raise UserError("give --model-dirs (one or more model directories)")
    names = config.names or [
        Path(d).name if Path(d).name != "model" else Path(d).parent.name for d in config.model_dirs
    ]
    if len(names) != len(config.model_dirs) or len(set(names)) != len(names):
        raise UserError(f"--names must give one distinct name per model directory, got {names}")
    run = RunDir.open(config.run_dir, config, may_change=("device", "model_dirs", "names"))
    corpus = load_corpus(config.corpus_dir)
    langs = config.langs or sorted(set(corpus["parallel"]["lang"]))
    require_langs(corpus, langs)
    prompts, prompt_langs = prompts_for(corpus, langs, config.prompts_per_lang, config.prompt_chars)
    done = run.keyed(("name",))
    for name, model_dir in zip(names, config.model_dirs):
        if (name,) not in done:
            record = {"name": name, **evaluate_model(config, model_dir, corpus, langs, prompts, prompt_langs)}
            run.log_metrics(record)
            done[(name,)] = record
    records = [done[(name,)] for name in names]
    results = {"langs": langs, "prompts": prompts, "prompt_langs": prompt_langs, "models": records}
    atomic_write_json(run.path / "results.json", results)
    (run.path / "report.md").write_text(report_markdown(results, config.samples_per_lang))
    return results


def report_markdown(results: dict, samples_per_lang: int) -> str:
    langs, models = results["langs"], results["models"]
    header = "| model | " + " | ".join(langs) + " |"
    rule = "|---" * (len(langs) + 1) + "|"

    def table(title: str, cell) -> list[str]:
        rows = [f"| {m['name']} | " + " | ".join(cell(m, lang) for lang in langs) + " |" for m in models]
        return [f"### {title}", "", header, rule, *rows, ""]

    lines = ["# Models side by side", ""]
    lines += table(
        "Held-out nats per character (lower is better)", lambda m, l: f"{m['nats_per_char'][l]:.3f}"
    )
    for mode in ("sampled", "greedy"):
        lines += table(
            f"Language consistency, {mode} (CLD2; unknown in brackets)",
            lambda m, l, mode=mode: f"{m[mode][l]['consistent']:.2f} ({m[mode][l]['unknown']:.2f})",
        )
        lines += table(
            f"Distinct-token share, {mode}", lambda m, l, mode=mode: f"{m[mode][l]['distinct_share']:.2f}"
        )
    lines += ["### Sampled continuations of the same prompts", ""]
    lines += ["| lang | prompt | " + " | ".join(m["name"] for m in models) + " |"]
    lines += ["|---" * (len(models) + 2) + "|"]
    for lang in langs:
        rows = [i for i, l in enumerate(results["prompt_langs"]) if l == lang][:samples_per_lang]
        for i in rows:
            cells = [_cell(m["continuations"]["sampled"][i]) for m in models]
            lines.append(f"| {lang} | {_cell(results['prompts'][i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|")
