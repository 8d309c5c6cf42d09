"""Document packing and a stateless, seeded data order.

Documents are tokenised, each preceded by `<|endoftext|>` (so the model always sees a document start
the way prompts are later given to it), concatenated per language, and cut into blocks of `n_ctx`
tokens. The training order is a pure function of (seed, position in the token stream): resuming at
step s reads exactly the batches an uninterrupted run would have read, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from jaxtyping import Int
from torch import Tensor


def pack_documents(
    token_lists: Sequence[Sequence[int]], eos_id: int, n_ctx: int
) -> Int[Tensor, "blocks n_ctx"]:
    """Concatenate `[eos] + doc` for every document and cut into full blocks (the tail is dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.append(eos_id)
        stream.extend(ids)
    n_blocks = len(stream) // n_ctx
    if n_blocks == 0:
        raise ValueError(f"only {len(stream)} tokens: not enough for one block of {n_ctx}")
    flat = torch.tensor(stream[: n_blocks * n_ctx], dtype=torch.int32)
    return rearrange(flat, "(blocks n_ctx) -> blocks n_ctx", n_ctx=n_ctx)


def pack_by_language(
    token_lists: Sequence[Sequence[int]],
    langs: Sequence[str],
    eos_id: int,
    n_ctx: int,
) -> tuple[Int[Tensor, "blocks n_ctx"], list[str]]:
    """Pack each language separately so every block is monolingual; return blocks and their languages."""
    blocks, block_langs = [], []
    for lang in sorted(set(langs)):
        docs = [ids for ids, doc_lang in zip(token_lists, langs) if doc_lang == lang]
        packed = pack_documents(docs, eos_id, n_ctx)
        blocks.append(packed)
        block_langs += [lang] * len(packed)
    return torch.cat(blocks), block_langs


def block_order(n_blocks: int, seed: int, start: int, count: int) -> Int[Tensor, " count"]:
    """Block indices at positions [start, start+count) of the infinite stream of seeded epoch permutations."""
    if n_blocks <= 0:
        raise ValueError("no training blocks")
    out = torch.empty(count, dtype=torch.long)
    filled = 0
    while filled < count:
        epoch, offset = divmod(start + filled, n_blocks)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(n_blocks, generator=generator)
        take = min(count - filled, n_blocks - offset)
        out[filled : filled + take] = permutation[offset : offset + take]
        filled += take
    return out


def micro_batch_indices(
    step: int, micro_batch: int, grad_accum: int, rank: int, world_size: int, n_blocks: int, seed: int
) -> list[Int[Tensor, " micro_batch"]]:
    """The blocks rank `rank` reads at optimizer step `step`, one tensor per accumulation micro-step.

    The global batch of a step is one contiguous window of the stream; micro-step a of rank r takes its
    (a·world + r)-th slice. So 1 process × 2 accumulation steps reads exactly the blocks that
    2 processes × 1 step read, and DDP runs match single-process runs up to float summation order.
    """
    global_batch = micro_batch * grad_accum * world_size
    window = block_order(n_blocks, seed, step * global_batch, global_batch)
    return [
        window[(a * world_size + rank) * micro_batch : (a * world_size + rank + 1) * micro_batch]
        for a in range(grad_accum)
    ]
