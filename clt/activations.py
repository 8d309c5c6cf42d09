"""Collect per-layer MLP inputs and outputs of an HF GPT-2 model into a Zarr v3 store.

Hook convention, used everywhere in the project: the CLT input of layer l is
`blocks.l.ln2.hook_normalized` (the MLP's input, i.e. normalised `resid_mid`), its target is
`blocks.l.hook_mlp_out` (training/hook_points.py maps the names to the model's modules). Position 0 of every block is the BOS token (`<|endoftext|>`) and is not stored:
its activations are outliers that attribution ignores anyway.

Store layout (a Zarr v3 group; any fsspec URL works, local by default):
- `mlp_in`, `mlp_out`: `[tokens, n_layers, d_model]`, float16 or float32, sharding codec (one shard =
  `blocks_per_shard` blocks), no compression (activations barely compress);
- `token_id` `[tokens]` int32, `lang` `[tokens]` int8 (index into the `langs` attribute), `position`
  `[tokens]` int16;
- `shard_done` `[n_shards]` uint8 with one chunk per shard: a writer sets its shard's byte only after
  the shard's data is written, and readers use only shards marked done. Several writers (torchrun ranks)
  fill disjoint shards (shard i belongs to rank i mod world_size), so no two processes write one object.
Attributes record the model path and hash, tokenizer, hook names, context, languages, dtype and the
per-layer normalisation statistics (mean L2 norm of `mlp_in` and `mlp_out`), computed when complete.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from training import hook_points, paths
from training.errors import CorruptData, ModelMismatch, UserError
from training.models import load_model

STORE_FORMAT_VERSION = 1
INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"  # MLP input
OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"  # MLP output


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
        default=32, metadata={"help": "blocks per inner chunk (divides blocks_per_shard)"}
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of the model weights: a store (and a CLT) records it so that mismatches are caught."""
    path = Path(model_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: expected a save_pretrained directory with safetensors weights"
        )
    return file_sha256(path)


# ---------------------------------------------------------------------------------------------
# Capturing activations
# ---------------------------------------------------------------------------------------------


class MLPActivationRecorder:
    """Every layer's MLP input (`blocks.l.ln2.hook_normalized`) and MLP output (`blocks.l.hook_mlp_out`) —
    the project's one definition of where CLT activations are read (training/hook_points.py).

    By default the tensors are kept in `inputs` / `outputs`; `sink(kind, layer, tensor)` (kind is
    "mlp_in" or "mlp_out") receives them instead, e.g. to copy them straight into a shard buffer."""

    def __init__(self, model, sink=None):
        self.model = model
        self.n_layers = hook_points.adapter(model).n_layers
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.sink = sink or self._keep

    def __enter__(self):
        named = []
        for layer in range(self.n_layers):
            named.append((INPUT_HOOK.format(layer=layer), self._hook("mlp_in", layer)))
            named.append((OUTPUT_HOOK.format(layer=layer), self._hook("mlp_out", layer)))
        self._context = hook_points.hooks(self.model, named)
        self._context.__enter__()
        return self

    def _hook(self, kind: str, layer: int):
        def hook(tensor):
            self.sink(kind, layer, tensor.detach())

        return hook

    def _keep(self, kind: str, layer: int, tensor: Tensor) -> None:
        (self.inputs if kind == "mlp_in" else self.outputs)[layer] = tensor

    def __exit__(self, *exc):
        self._context.__exit__(*exc)

    def stacked(self) -> tuple[Float[Tensor, "batch pos layer d"], Float[Tensor, "batch pos layer d"]]:
        layers = range(self.n_layers)
        return (
            torch.stack([self.inputs[l] for l in layers], dim=2),
            torch.stack([self.outputs[l] for l in layers], dim=2),
        )


@torch.no_grad()
def mlp_activations(
    model, input_ids: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos layer d"], Float[Tensor, "batch pos layer d"]]:
    """Every layer's MLP input and output. Runs the transformer body only: the unembedding (which on a
    small model with an 8k vocabulary costs more than all the layers together) is not needed."""
    with MLPActivationRecorder(model) as recorder:
        model.transformer(input_ids=input_ids)
        return recorder.stacked()


# ---------------------------------------------------------------------------------------------
# Token blocks for collection
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class StoreNotFound(UserError, FileNotFoundError):
    """No (complete) store at the given URL."""


class ActivationStore:
    """Read access to a collected store; only shards marked done are visible."""

    def __init__(self, url: str | os.PathLike, writable: bool = False):
        self.url = str(url)
        try:
            self.group = zarr.open_group(self.url, mode="r+" if writable else "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
            raise StoreNotFound(
                f"no activation store at {self.url}; collect one with scripts/collect_activations.py"
            ) from error
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(f"{self.url} is not an activation store of format {STORE_FORMAT_VERSION}")
        self.n_layers: int = self.attrs["n_layers"]
        self.d_model: int = self.attrs["d_model"]
        self.tokens_per_shard: int = self.attrs["tokens_per_shard"]
        self.langs: list[str] = self.attrs["langs"]
        self.mlp_in = self.group["mlp_in"]
        self.mlp_out = self.group["mlp_out"]

    @property
    def done_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.group["shard_done"][:])]

    @property
    def n_shards(self) -> int:
        return int(self.group["shard_done"].shape[0])

    def is_complete(self) -> bool:
        return len(self.done_shards) == self.n_shards

    def read_shard(
        self, shard: int, fields: tuple[str, ...] = ("mlp_in", "mlp_out")
    ) -> dict[str, np.ndarray]:
        if not self.group["shard_done"][shard]:
            raise ValueError(f"shard {shard} of {self.url} is not complete and must not be read")
        rows = slice(shard * self.tokens_per_shard, (shard + 1) * self.tokens_per_shard)
        try:
            return {name: self.group[name][rows] for name in fields}
        except Exception as error:  # zarr reports a damaged shard as a checksum or decode error
            model = self.attrs.get("model_path", "MODEL_DIR")
            raise CorruptData(
                f"shard {shard} of {self.url} cannot be read ({type(error).__name__}: {error}); the store "
                f"is damaged: delete it and recollect with `python scripts/collect_activations.py "
                f"--model-dir {model} --store {self.url}` (or rerun train_clt.py, which collects a "
                "missing store)"
            ) from error

    def norm_scales(self) -> tuple[list[float], list[float]]:
        """Per-layer scale factors sqrt(d) / E‖x‖ for inputs and outputs (docs/methods.md §1)."""
        stats = self.attrs.get("norm_stats")
        if stats is None:
            raise ValueError(f"{self.url} has no normalisation statistics yet: finish collecting it first")
        root_d = self.d_model**0.5
        return [root_d / n for n in stats["mlp_in_mean_norm"]], [
            root_d / n for n in stats["mlp_out_mean_norm"]
        ]

    def check_model(self, model_dir: str | Path) -> None:
        fingerprint = model_fingerprint(model_dir)
        if fingerprint != self.attrs["model_sha256"]:
            raise ModelMismatch(
                f"activation store {self.url} was collected from {self.attrs['model_path']} "
                f"(sha256 {self.attrs['model_sha256'][:12]}…), not from {model_dir} (sha256 {fingerprint[:12]}…)"
            )


def _create_store(config: CollectConfig, model, tokenizer, n_blocks: int, langs: list[str], fingerprint: str):
    n_layers, d_model = model.config.n_layer, model.config.n_embd
    tokens_per_block = config.n_ctx - 1
    tokens_per_shard = config.blocks_per_shard * tokens_per_block
    n_shards = n_blocks // config.blocks_per_shard
    total = n_shards * tokens_per_shard
    group = zarr.open_group(config.store, mode="w")
    group.attrs.update(
        {
            "model_path": str(config.model_dir),
            "model_sha256": fingerprint,
            "tokenizer": str(config.model_dir),
            "input_hook": INPUT_HOOK,
            "output_hook": OUTPUT_HOOK,
            "n_ctx": config.n_ctx,
            "positions_stored": "1..n_ctx-1 (BOS position 0 dropped)",
            "n_layers": n_layers,
            "d_model": d_model,
            "dtype": config.dtype,
            "langs": langs,
            "mixture": config.mixture,
            "seed": config.seed,
            "tokens_per_shard": tokens_per_shard,
            "blocks_per_shard": config.blocks_per_shard,
            "n_tokens": total,
        }
    )
    chunk_tokens = config.blocks_per_chunk * tokens_per_block
    for name in ("mlp_in", "mlp_out"):
        group.create_array(
            name,
            shape=(total, n_layers, d_model),
            dtype=config.dtype,
            chunks=(chunk_tokens, n_layers, d_model),
            shards=(tokens_per_shard, n_layers, d_model),
            compressors=None,
            dimension_names=("token", "layer", "d_model"),
        )
    for name, dtype in (("token_id", "int32"), ("lang", "int8"), ("position", "int16")):
        group.create_array(
            name,
            shape=(total,),
            dtype=dtype,
            chunks=(chunk_tokens,),
            shards=(tokens_per_shard,),
            compressors=None,
            dimension_names=("token",),
        )
    group.create_array("shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs["format_version"] = STORE_FORMAT_VERSION  # last: marks the layout as complete
    return group


def collect_activations(config: CollectConfig, rank: int = 0, world_size: int = 1) -> ActivationStore:
    """Fill the store (creating it if needed, resuming otherwise); returns it when this rank is done."""
    from training.corpus.build import default_corpus_dir, load_corpus
    from training.mixtures import parse_mixture

    if config.blocks_per_shard % config.blocks_per_chunk:
        raise ValueError(
            f"blocks_per_chunk={config.blocks_per_chunk} must divide blocks_per_shard={config.blocks_per_shard}"
        )
    if config.dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {config.dtype!r}")
    model, tokenizer = load_model(config.model_dir, config.device)
    device = model.device
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
            f"only {len(blocks)} blocks for shards of {config.blocks_per_shard}: raise n_tokens or lower blocks_per_shard"
        )

    # Rank 0 alone decides whether to create the store; everyone meets at the barrier either way, so
    # no rank can race past it by finding a store that rank 0 has just created.
    if rank == 0 and _open_existing(config.store) is None:
        _create_store(config, model, tokenizer, len(blocks), langs, fingerprint)
    _barrier(world_size)
    store = ActivationStore(config.store, writable=True)
    if (
        store.attrs["model_sha256"] != fingerprint
        or store.attrs["n_ctx"] != config.n_ctx
        or store.attrs["seed"] != config.seed
        or store.attrs["mixture"] != config.mixture
    ):
        raise ModelMismatch(
            f"{config.store} holds a store from another model or config; choose a new --store to collect afresh"
        )
    lang_index = {lang: i for i, lang in enumerate(store.langs)}

    mine = [s for s in range(store.n_shards) if s % world_size == rank and s not in set(store.done_shards)]
    loop_start = time.perf_counter()
    # One writer thread: shard i is written while shard i+1 is computed (Zarr I/O releases the GIL).
    # At most one write is pending, and each write sets its completion byte after its data.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for shard in tqdm(
            mine, desc=f"collect (rank {rank})", disable=rank != 0 and world_size > 1, unit="shard"
        ):
            arrays = _compute_shard(model, blocks, block_langs, lang_index, shard, config, device)
            if pending is not None:
                pending.result()  # re-raises a failed write
            pending = writer.submit(_write_shard, store, shard, arrays)
        if pending is not None:
            pending.result()
    if rank == 0 and mine:
        # Forward passes + Zarr writes only (no model/corpus loading): comparable to forward_only_throughput.
        store.group.attrs["last_collection_rank0"] = {
            "shards": len(mine),
            "seconds": time.perf_counter() - loop_start,
            "tokens": len(mine) * store.tokens_per_shard,
        }
    _barrier(world_size)
    if rank == 0 and "norm_stats" not in store.group.attrs:
        store.group.attrs["norm_stats"] = _norm_stats(store)
    _barrier(world_size)
    return ActivationStore(config.store)


def _compute_shard(
    model, blocks, block_langs, lang_index, shard: int, config: CollectConfig, device
) -> dict[str, np.ndarray]:
    """Forward passes for one shard: the arrays to write, in store order.

    Hooks copy each layer's activations (BOS position dropped) straight into preallocated float16/32
    shard buffers: one copy per tensor instead of stack → slice → cast → concatenate."""
    first = shard * config.blocks_per_shard
    shard_blocks = blocks[first : first + config.blocks_per_shard]
    n_pos = config.n_ctx - 1
    n_layers, d_model = model.config.n_layer, model.config.n_embd
    dtype = getattr(torch, config.dtype)
    buffers = {
        name: torch.empty(len(shard_blocks), n_pos, n_layers, d_model, dtype=dtype)
        for name in ("mlp_in", "mlp_out")
    }
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


def _write_shard(store: ActivationStore, shard: int, arrays: dict[str, np.ndarray]) -> None:
    rows = slice(shard * store.tokens_per_shard, (shard + 1) * store.tokens_per_shard)
    for name, values in arrays.items():
        store.group[name][rows] = values
    store.group["shard_done"][shard] = 1  # last: the shard becomes visible only once complete


def _norm_stats(store: ActivationStore, max_tokens: int = 50_000) -> dict:
    shards = store.done_shards[: max(1, max_tokens // store.tokens_per_shard)]
    sums_in, sums_out, count = np.zeros(store.n_layers), np.zeros(store.n_layers), 0
    for shard in shards:
        data = store.read_shard(shard)
        sums_in += np.linalg.norm(data["mlp_in"].astype(np.float32), axis=-1).sum(0)
        sums_out += np.linalg.norm(data["mlp_out"].astype(np.float32), axis=-1).sum(0)
        count += len(data["mlp_in"])
    return {
        "mlp_in_mean_norm": (sums_in / count).tolist(),
        "mlp_out_mean_norm": (sums_out / count).tolist(),
        "tokens": count,
    }


def _open_existing(url: str) -> ActivationStore | None:
    """The store at `url`, or None if there is none or its creation was interrupted (then it is recreated)."""
    try:
        group = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if "format_version" not in group.attrs:
        return None
    return ActivationStore(url)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def forward_only_throughput(
    model_dir: str, blocks: Tensor, batch_size: int, with_head: bool = False
) -> float:
    """Stored tokens/s of the bare forward pass over `blocks`: the baseline for collection overhead.
    Without the head it is the same computation collection needs (transformer body, no hooks, no writes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    forward = model if with_head else model.transformer
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            forward(input_ids=blocks[i : i + batch_size].long())
    return blocks[:, 1:].numel() / (time.perf_counter() - start)
