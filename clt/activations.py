"""Collect per-layer MLP inputs and outputs of a model into an activation store (clt/store.py).

Hook convention, used everywhere in the project: the CLT input of layer l is
`blocks.l.ln2.hook_normalized` (the MLP's input, i.e. normalised `resid_mid`), its target is
`blocks.l.hook_mlp_out` (clt/recorder.py; training/hook_points.py maps the names to modules). Position 0
of every block is the BOS token (`<|endoftext|>`) and is not stored: its activations are outliers that
attribution ignores anyway. Collection resumes shard by shard; torchrun ranks fill disjoint shards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from clt.recorder import MLPActivationRecorder
from clt.store import (
    ActivationStore,
    create_store,
    norm_stats,
    open_existing,
    page_aligned_empty,
    write_shard,
)
from training import paths
from training.errors import ModelMismatch, UserError
from training.fingerprint import model_fingerprint
from training.loop import Dist
from training.models import load_model


@dataclass
class CollectOptions:
    """What to collect: the token mixture, how much, and how it is laid out in the store."""

    mixture: str = field(default="balanced", metadata={"help": "language mixture of the collected tokens"})
    n_tokens: int = field(
        default=400_000, metadata={"help": "tokens to collect (rounded up to whole shards)"}
    )
    n_ctx: int = field(
        default=64, metadata={"help": "block length including the BOS position (≤ model context)"}
    )
    blocks_per_shard: int = field(default=256, metadata={"help": "blocks per Zarr shard"})
    blocks_per_chunk: int = field(
        default=0,
        metadata={
            "help": "blocks per inner chunk (divides blocks_per_shard; 0: one chunk per shard — readers take "
            "whole shards, and one chunk writes 1.7× faster than eight)"
        },
    )
    batch_size: int = field(default=32, metadata={"help": "blocks per forward pass"})
    dtype: str = field(default="float16", metadata={"help": "float16 or float32"})


@dataclass
class CollectConfig(CollectOptions):
    """Collect MLP input/output activations of a GPT-2 model into a Zarr v3 store."""

    model_dir: str = field(
        default=paths.MODEL_DIR, metadata={"help": "HF model directory (save_pretrained) with its tokenizer"}
    )
    store: str = field(default=paths.STORE, metadata={"help": "Zarr store path or fsspec URL"})
    corpus_dir: str | None = field(
        default=None, metadata={"help": "corpus DatasetDict (default: the project's default corpus)"}
    )
    split: str = field(default="train", metadata={"help": "corpus split to read"})
    seed: int = field(default=0, metadata={"help": "mixture sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})


def collection_blocks(
    tokenizer,
    texts: list[str],
    langs: list[str],
    mixture: dict[str, float],
    n_tokens: int,
    n_ctx: int,
    seed: int,
) -> tuple[Int[Tensor, "blocks n_ctx"], list[str]]:
    """Blocks of `n_ctx` tokens, each `[BOS] + n_ctx−1 tokens` of one language's packed text."""
    from training.mixtures import sample_mixture
    from training.tokenizer import count_tokens

    sample = sample_mixture(texts, langs, mixture, n_tokens, count_tokens(tokenizer), seed=seed)
    ids = tokenizer([texts[i] for i in sample.indices], add_special_tokens=False)["input_ids"]
    blocks, block_langs = bos_blocks(ids, [langs[i] for i in sample.indices], tokenizer, n_ctx)
    order = torch.randperm(
        len(blocks), generator=torch.Generator().manual_seed(seed)
    )  # mix languages across shards
    return blocks[order], [block_langs[i] for i in order.tolist()]


def bos_blocks(
    token_lists: list[list[int]], langs: list[str], tokenizer, n_ctx: int
) -> tuple[Int[Tensor, "blocks n_ctx"], list[str]]:
    """Pack each language's documents into `n_ctx − 1` tokens and put BOS in front of every block."""
    from training.data import pack_by_language

    body, block_langs = pack_by_language(token_lists, langs, tokenizer.eos_token_id, n_ctx - 1)
    bos = torch.full((len(body), 1), tokenizer.bos_token_id, dtype=body.dtype)
    return torch.cat([bos, body], dim=1), block_langs


def collect_activations(config: CollectConfig, world: Dist | None = None) -> ActivationStore:
    """Fill the store (creating it if needed, resuming otherwise); returns it when this rank is done.
    Under torchrun, `world` says which shards are this rank's."""
    world = world or Dist()
    rank, world_size = world.rank, world.world_size
    from training.corpus.build import default_corpus_dir, load_corpus
    from training.mixtures import parse_mixture

    if config.blocks_per_chunk and config.blocks_per_shard % config.blocks_per_chunk:
        raise ValueError(
            f"blocks_per_chunk={config.blocks_per_chunk} must divide "
            f"blocks_per_shard={config.blocks_per_shard}"
        )
    if config.dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {config.dtype!r}")
    model, tokenizer = load_model(config.model_dir, config.device)
    if config.n_ctx > model.config.n_positions:
        raise UserError(f"n_ctx={config.n_ctx} exceeds the model's context {model.config.n_positions}")
    fingerprint = model_fingerprint(config.model_dir)

    corpus = load_corpus(config.corpus_dir or default_corpus_dir())[config.split]
    texts, text_langs = list(corpus["text"]), list(corpus["lang"])
    mixture = parse_mixture(config.mixture)
    blocks, block_langs = collection_blocks(
        tokenizer, texts, text_langs, mixture, config.n_tokens, config.n_ctx, config.seed
    )
    langs = sorted(mixture)
    if len(blocks) < config.blocks_per_shard:
        raise ValueError(
            f"only {len(blocks)} blocks for shards of {config.blocks_per_shard}: raise n_tokens or lower "
            "blocks_per_shard"
        )

    # Rank 0 alone decides whether to create the store; everyone meets at the barrier either way, so
    # no rank can race past it by finding a store that rank 0 has just created.
    if rank == 0 and open_existing(config.store) is None:
        create_store(config, model, tokenizer, len(blocks), langs, fingerprint)
    world.barrier()
    store = ActivationStore(config.store, writable=True)
    wanted = {
        "model_sha256": fingerprint,
        "n_ctx": config.n_ctx,
        "seed": config.seed,
        "mixture": config.mixture,
        "blocks_per_shard": config.blocks_per_shard,
        "n_tokens": store.tokens_per_shard * store.n_shards
        if len(blocks) // config.blocks_per_shard == store.n_shards
        else "a different number of shards",
    }
    differing = {
        key: (store.attrs.get(key), value) for key, value in wanted.items() if store.attrs.get(key) != value
    }
    if differing:
        details = ", ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in differing.items())
        raise ModelMismatch(
            f"{config.store} holds a store collected with another model or config ({details}); "
            "choose a new --store to collect afresh"
        )
    lang_index = {lang: i for i, lang in enumerate(store.langs)}

    mine = [s for s in range(store.n_shards) if s % world_size == rank and s not in set(store.done_shards)]
    loop_start = time.perf_counter()
    fill_shards(
        model,
        blocks,
        block_langs,
        lang_index,
        mine,
        config,
        store,
        writes="thread",
        rank=rank,
        world_size=world_size,
    )
    if rank == 0 and mine:
        # Forward passes + Zarr writes only (no model/corpus loading): comparable to forward_only_throughput.
        store.group.attrs["last_collection_rank0"] = {
            "shards": len(mine),
            "seconds": time.perf_counter() - loop_start,
            "tokens": len(mine) * store.tokens_per_shard,
        }
    world.barrier()
    if rank == 0 and "norm_stats" not in store.group.attrs:
        store.group.attrs["norm_stats"] = norm_stats(store)
    world.barrier()
    return ActivationStore(config.store)


def fill_shards(
    model,
    blocks,
    block_langs,
    lang_index,
    shards: list[int],
    config: CollectConfig,
    store: ActivationStore | None,
    writes: str = "thread",
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Compute and write `shards`. `writes` says how: "thread" (collection's way: shard i written on one
    writer thread while shard i+1 is computed), "inline" (each shard written before the next is computed)
    or "none" (computed, not written — the benchmark's measure of what the hooks and the copies into the
    shard buffers cost on top of the forward).

    Why a thread: the shard's chunks go to disk with direct I/O (clt/store.py:write_direct), so the
    writer spends its time waiting on the disk, not on a core, and that wait overlaps the next shard's
    forward. (With buffered writes it did not help: the page-cache copies and writeback cost 1–2 s of
    kernel CPU per 800 MB, on the same 2 cores the forward's threads occupy, and a thread measured the
    same as inline.) The thread runs at normal priority: niced to 19 it was starved by torch's spinning
    workers, so a 0.035 s write stretched over ≈ 0.32 s — the whole next shard — and its slices kept
    interrupting the forward. Measured on the base model over 400k tokens (docs/performance.md §3,
    benchmarks/bench_clt.py, medians of 3): buffered inline +20–32% over the bare forward, direct inline
    +12–17%, direct on a niced thread +10–12%, on an ordinary thread +8% (collection as a whole +7%); the
    hooks with their copies −1% to +3%.

    Two sets of shard buffers alternate: with a writer thread, shard i's set is being written while shard
    i+1 fills the other, and a set is reused only after its write has finished (at most one write is
    pending, and each write sets its completion byte after its data). Fresh buffers per shard would
    page-fault and zero tens of MB each time."""
    if writes not in ("thread", "inline", "none"):
        raise ValueError(f"writes must be thread, inline or none, got {writes!r}")
    device = model.device
    buffer_sets = [_shard_buffers(model, config) for _ in range(2 if len(shards) > 1 else len(shards))]
    progress = tqdm(shards, desc=f"collect (rank {rank})", disable=rank != 0 and world_size > 1, unit="shard")
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for i, shard in enumerate(progress):
            arrays = _compute_shard(
                model, blocks, block_langs, lang_index, shard, config, device, buffer_sets[i % 2]
            )
            if pending is not None:
                pending.result()  # re-raises a failed write
                pending = None
            if writes == "thread":
                pending = writer.submit(write_shard, store, shard, arrays)
            elif writes == "inline":
                write_shard(store, shard, arrays)
        if pending is not None:
            pending.result()


def _shard_buffers(model, config: CollectConfig) -> dict[str, Float[Tensor, "block pos layer d"]]:
    """One shard's MLP input and output buffers, in the store's dtype."""
    shape = (config.blocks_per_shard, config.n_ctx - 1, model.config.n_layer, model.config.n_embd)
    # page-aligned: a shard's chunk then goes to disk with direct I/O, without a copy (store.write_direct)
    return {name: page_aligned_empty(shape, getattr(torch, config.dtype)) for name in ("mlp_in", "mlp_out")}


def _compute_shard(
    model, blocks, block_langs, lang_index, shard: int, config: CollectConfig, device, buffers
) -> dict[str, np.ndarray]:
    """Forward passes for one shard: the arrays to write, in store order (the activations are views of
    `buffers`, which must not be refilled before they are written).

    Hooks copy each layer's activations (BOS position dropped) straight into the preallocated float16/32
    shard buffers: one copy per tensor instead of stack → slice → cast → concatenate."""
    first = shard * config.blocks_per_shard
    shard_blocks = blocks[first : first + config.blocks_per_shard]
    n_pos = config.n_ctx - 1
    rows = slice(0, 0)

    def copy_into_buffer(kind: str, layer: int, tensor: Tensor) -> None:
        buffers[kind][rows, :, layer].copy_(tensor[:, 1:])  # BOS position dropped

    with MLPActivationRecorder(model, sink=copy_into_buffer), torch.no_grad():
        for start in range(0, len(shard_blocks), config.batch_size):
            batch = shard_blocks[start : start + config.batch_size]
            rows = slice(start, start + len(batch))
            model.transformer(input_ids=batch.long().to(device))
    return {
        "mlp_in": rearrange(buffers["mlp_in"], "b p l d -> (b p) l d").numpy(),
        "mlp_out": rearrange(buffers["mlp_out"], "b p l d -> (b p) l d").numpy(),
        "token_id": rearrange(shard_blocks[:, 1:], "b p -> (b p)").numpy().astype(np.int32),
        "lang": np.repeat(
            [lang_index[block_langs[first + i]] for i in range(len(shard_blocks))], n_pos
        ).astype(np.int8),
        "position": np.tile(np.arange(1, config.n_ctx, dtype=np.int16), len(shard_blocks)),
    }
