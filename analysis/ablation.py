"""Layer-ablation sweeps from the input and the output side (CogSym, docs/methods.md §4).

For k = 0 … L−1 the first k layers (input side) or the last k layers (output side) are skipped — each
skipped block passes its input through, i.e. its attention and MLP updates are zeroed. k = 0 is the
intact model. Three measurements per setting and language X:

- production loss: next-token loss on held-out text in X (the model must *produce* X);
- comprehension-type loss: loss on the known language's tokens (default English) that follow the X
  version of the same paragraph — `[BOS] X-paragraph \\n known-paragraph`, scored only on the known
  part — the model must *read* X to profit from it, and is scored in a language it produces well;
- language consistency: share of greedy continuations of X prompts that CLD2 judges to be X.
CogSym's expectation: ablating input-side layers hurts comprehension first, output-side layers hurt
production (and consistency) first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from analysis.residuals import SkipLayers
from training.evaluate import continuation_consistency


def ablation_settings(n_layers: int) -> list[dict]:
    settings = [{"side": "none", "k": 0, "layers": []}]
    for k in range(1, n_layers):
        settings.append({"side": "input", "k": k, "layers": list(range(k))})
        settings.append({"side": "output", "k": k, "layers": list(range(n_layers - k, n_layers))})
    return settings


@torch.no_grad()
def scored_loss(model, sequences: list[list[int]], scored_from: list[int], batch_size: int = 16) -> float:
    """Mean next-token loss over positions ≥ scored_from[i] of each sequence (right-padded batches)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk, first = sequences[start : start + batch_size], scored_from[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (seq, f) in enumerate(zip(chunk, first)):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, f : len(seq)] = torch.tensor(seq[f:])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
        target = labels[:, 1:].to(device)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError("nothing to score")
    return total / count


def comprehension_sequences(
    tokenizer, pairs: list[tuple[str, str]], max_tokens: int = 128
) -> tuple[list[list[int]], list[int]]:
    """`[BOS] source \\n known` token lists and the index where the scored (known-language) part starts."""
    sequences, starts = [], []
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for source, known in pairs:
        src = tokenizer(source, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(known, add_special_tokens=False)["input_ids"]
        budget = max_tokens - 1 - len(newline)
        src, tgt = src[: budget // 2], tgt[: budget - min(len(src), budget // 2)]
        seq = [tokenizer.bos_token_id] + src + newline + tgt
        sequences.append(seq)
        starts.append(1 + len(src) + len(newline))
    return sequences, starts


def ablation_sweep(
    model,
    tokenizer,
    langs: list[str],
    production_blocks: dict[str, Int[Tensor, "n pos"]],
    parallel: dict[str, dict[str, str]],
    prompts: dict[str, list[str]],
    known_lang: str = "en",
    prompt_tokens: int = 16,
    new_tokens: int = 24,
    max_tokens: int = 128,
) -> dict:
    """Every ablation setting × language: production loss, comprehension-type loss (X → known), and
    greedy language consistency. `parallel` is {parallel_id: {lang: text}}; `prompts[lang]` are texts
    whose first `prompt_tokens` tokens are continued."""
    device = next(model.parameters()).device
    n_layers = len(model.transformer.h)
    results = []
    ids = sorted(parallel)
    for setting in ablation_settings(n_layers):
        row = {**setting, "production_loss": {}, "comprehension_loss": {}, "consistency": {}}
        with SkipLayers(model, setting["layers"]):
            for lang in langs:
                blocks = production_blocks[lang]
                row["production_loss"][lang] = scored_loss(
                    model, [b.tolist() for b in blocks], [1] * len(blocks)
                )
                if lang != known_lang:
                    seqs, starts = comprehension_sequences(
                        tokenizer, [(parallel[i][lang], parallel[i][known_lang]) for i in ids], max_tokens
                    )
                    row["comprehension_loss"][lang] = scored_loss(model, seqs, starts)
                report, _ = continuation_consistency(
                    model,
                    tokenizer,
                    prompts[lang],
                    [lang] * len(prompts[lang]),
                    prompt_tokens,
                    new_tokens,
                    greedy=True,
                    device=device,
                )
                row["consistency"][lang] = report[lang]["consistent"]
        results.append(row)
    return {"known_lang": known_lang, "n_layers": n_layers, "settings": results}


def plot_ablation(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("production_loss", "production loss (nats)"),
        ("comprehension_loss", "comprehension-type loss (nats)"),
        ("consistency", "greedy language consistency"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, metrics):
        for side, style in (("input", "-o"), ("output", "--s")):
            rows = [r for r in report["settings"] if r["side"] in ("none", side)]
            ks = [r["k"] for r in rows]
            langs = sorted(rows[0][key])
            mean = [sum(r[key][l] for l in langs) / len(langs) for r in rows]
            ax.plot(
                ks, mean, style, label=f"skip first k ({side})" if side == "input" else "skip last k (output)"
            )
        ax.set_xlabel("k layers skipped")
        ax.set_title(label + " — mean over languages", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
