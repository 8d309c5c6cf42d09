"""Language-model evaluations shared by pretraining, fine-tuning and later analyses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from training import langid
from training.errors import UserError
from training.sampling import generate_kwargs


def next_token_kl(
    logits_p: Float[Tensor, "*batch vocab"],
    logits_q: Float[Tensor, "*batch vocab"],
    rows_per_chunk: int = 512,
) -> Float[Tensor, "*batch"]:
    """KL(p ‖ q) per position between two next-token distributions given as logits.

    Summed in float64, a chunk of positions at a time (a lens over every layer holds layers × batch × pos ×
    vocab logits). KL ≥ 0 exactly, so the sum is clamped at 0: a near-identical pair (an fp16-rounded copy,
    a perfect replacement) reads 0 rather than the −5e-9 that a float32 sum once returned in CI.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    flat_p, flat_q = logits_p.reshape(-1, logits_p.shape[-1]), logits_q.reshape(-1, logits_q.shape[-1])
    kl = torch.empty(flat_p.shape[0], dtype=torch.float64, device=logits_p.device)
    for start in range(0, flat_p.shape[0], rows_per_chunk):
        log_p = torch.log_softmax(flat_p[start : start + rows_per_chunk].double(), -1)
        log_q = torch.log_softmax(flat_q[start : start + rows_per_chunk].double(), -1)
        kl[start : start + rows_per_chunk] = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.clamp_min(0).reshape(logits_p.shape[:-1]).to(torch.promote_types(logits_p.dtype, torch.float32))


@torch.no_grad()
def mean_loss(model, blocks: Int[Tensor, "blocks n_ctx"], micro_batch: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `blocks`."""
    if len(blocks) == 0:
        raise ValueError("no blocks to evaluate")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), micro_batch):
        batch = blocks[start : start + micro_batch].long().to(device)
        loss = model(input_ids=batch, labels=batch).loss  # mean over batch × (n_ctx − 1) predictions
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def loss_per_language(
    model, blocks_by_lang: dict[str, Tensor], micro_batch: int, device: torch.device
) -> dict[str, float]:
    return {
        lang: mean_loss(model, blocks, micro_batch, device) for lang, blocks in sorted(blocks_by_lang.items())
    }


@torch.no_grad()
def nats_per_char(
    model, tokenizer, texts: Sequence[str], n_ctx: int, device: torch.device, batch_size: int = 16
) -> float:
    """Held-out loss in nats per character: the summed negative log-likelihood of every token of every
    text (the first predicted from BOS), divided by the texts' characters. Unlike nats per token it
    compares models with different tokenizers. A text longer than the context is scored in windows of
    `n_ctx − 1` tokens, each after its own BOS (no context carried over: a slight overestimate)."""
    if not texts:
        raise ValueError("no texts to evaluate")
    was_training = model.training
    model.eval()
    windows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for start in range(0, len(ids), n_ctx - 1):
            windows.append([tokenizer.bos_token_id] + ids[start : start + n_ctx - 1])
    windows.sort(key=len)  # similar lengths per batch: little padding
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, window in enumerate(batch):
            ids[row, : len(window)] = torch.tensor(window)
            mask[row, : len(window)] = 1
        ids, mask = ids.to(device), mask.to(device)
        log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nll = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        total += float((nll * mask[:, 1:]).sum())
    model.train(was_training)
    return total / sum(len(text) for text in texts)


def distinct_share(token_ids: Sequence[int]) -> float:
    """Share of distinct tokens in a generated sequence: 1 for no repetition, 1/n for one token n times."""
    return len(set(token_ids)) / max(1, len(token_ids))


@torch.no_grad()
def generate_continuations(
    model,
    tokenizer,
    texts: Sequence[str],
    prompt_tokens: int | None,
    new_tokens: int,
    greedy: bool,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 32,
    pad: bool = False,
) -> tuple[list[str], list[str], list[list[int]]]:
    """Continue each text (after a BOS) — its first `prompt_tokens` tokens, or all of it if None — greedily
    or with the project's nucleus sampler (training/sampling.py); return (prompts, continuations,
    continuation token ids), in the order of `texts`.

    Prompts of equal token length are batched together, so batches need no padding. Texts shorter than
    `prompt_tokens` are skipped by the caller (`usable_prompts`). With `pad`, prompts of any lengths share
    batches, left-padded and masked (GPT-2 then counts positions from each prompt's first token): for
    prompts that all differ in length, as LinguaMap's, that is batch_size× fewer passes, and greedy
    continuations are the same as unpadded ones (tested).
    """
    bos = tokenizer.bos_token_id
    encoded = [
        [bos] + ids[:prompt_tokens] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ]
    longest = max((len(ids) for ids in encoded), default=0)
    if longest + new_tokens > model.config.n_positions:
        raise UserError(
            f"a prompt of {longest - 1} tokens (+ BOS) and {new_tokens} new tokens exceed the model's "
            f"context of {model.config.n_positions}: use shorter prompts or fewer new tokens"
        )
    was_training = model.training
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # sampling is reproducible and leaves the caller's RNG untouched
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    if pad:  # one group, sorted by length so that each batch pads little
        by_length = {0: sorted(range(len(encoded)), key=lambda i: len(encoded[i]))}
    prompts, continuations, generated = [""] * len(texts), [""] * len(texts), [[] for _ in texts]
    sampling = generate_kwargs(sampled=not greedy)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                **sampling,
                pad_token_id=pad_id,
                eos_token_id=None,  # always `new_tokens`: equal-length continuations are judged alike
            )
            for i, row in zip(chunk, output.tolist()):
                prompts[i] = tokenizer.decode(encoded[i][1:])
                continuations[i] = tokenizer.decode(row[width:], skip_special_tokens=True)
                generated[i] = row[width:]
    torch.set_rng_state(generator_state)
    model.train(was_training)
    return prompts, continuations, generated


def usable_prompts(
    tokenizer,
    texts: Sequence[str],
    langs: Sequence[str],
    prompt_tokens: int,
    per_lang: int,
) -> tuple[list[str], list[str]]:
    """The first `per_lang` texts of each language with more than `prompt_tokens` tokens."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    chosen_texts, chosen_langs, taken = [], [], {}
    for text, lang, n in zip(texts, langs, lengths):
        if n > prompt_tokens and taken.get(lang, 0) < per_lang:
            chosen_texts.append(text)
            chosen_langs.append(lang)
            taken[lang] = taken.get(lang, 0) + 1
    return chosen_texts, chosen_langs


def continuation_consistency(
    model,
    tokenizer,
    texts: Sequence[str],
    langs: Sequence[str],
    prompt_tokens: int | None,
    new_tokens: int,
    greedy: bool,
    device: torch.device,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Per prompt language: share of continuations the language identifier assigns to that language, and
    the mean share of distinct tokens in them (low = the model repeats itself)."""
    prompts, continuations, generated = generate_continuations(
        model, tokenizer, texts, prompt_tokens, new_tokens, greedy, device, seed
    )
    distinct = [distinct_share(ids) for ids in generated]
    records, report = [], {}
    for lang in sorted(set(langs)):
        rows = [i for i, l in enumerate(langs) if l == lang]
        report[lang] = langid.consistency([continuations[i] for i in rows], [lang] * len(rows))
        report[lang]["distinct_share"] = sum(distinct[i] for i in rows) / len(rows)
    for prompt, continuation, lang, share in zip(prompts, continuations, langs, distinct):
        records.append(
            {
                "lang": lang,
                "prompt": prompt,
                "continuation": continuation,
                "detected": langid.detect(continuation),
                "distinct_share": share,
                "greedy": greedy,
            }
        )
    return report, records
