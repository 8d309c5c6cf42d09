"""The activation store: a Zarr v3 group of MLP inputs/outputs written shard by shard.

Layout (any fsspec URL works, local by default):
- `mlp_in`, `mlp_out`: `[tokens, n_layers, d_model]`, float16 or float32, one chunk per shard (a shard =
  `blocks_per_shard` blocks; with `blocks_per_chunk` smaller, the sharding codec holds several chunks per
  shard), no compression (activations barely compress);
- `token_id` `[tokens]` int32, `lang` `[tokens]` int8 (index into the `langs` attribute), `position`
  `[tokens]` int16;
- `shard_done` `[n_shards]` uint8 with one chunk per shard: a writer sets its shard's byte only after
  the shard's data is written, and readers use only shards marked done. Several writers (torchrun ranks)
  fill disjoint shards (shard i belongs to rank i mod world_size), so no two processes write one object.
Attributes record the model path and hash, tokenizer, hook names, context, languages, dtype and the
per-layer normalisation statistics (mean L2 norm of `mlp_in` and `mlp_out`), computed when complete.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.storage

from clt.recorder import INPUT_HOOK, OUTPUT_HOOK
from training.errors import CorruptData, ModelMismatch, UserError
from training.fingerprint import model_fingerprint

STORE_FORMAT_VERSION = 1


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
                f"(sha256 {self.attrs['model_sha256'][:12]}…), not from {model_dir} (sha256 "
                f"{fingerprint[:12]}…)"
            )


def create_store(config, model, tokenizer, n_blocks: int, langs: list[str], fingerprint: str):
    """A new, empty store laid out for `config` (a CollectConfig); `format_version` is written last."""
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
    chunk_tokens = (config.blocks_per_chunk or config.blocks_per_shard) * tokens_per_block
    # One chunk per shard is a plain chunked array (its file is the shard's raw bytes, which write_shard
    # writes directly); only several chunks per shard need the sharding codec.
    sharded = chunk_tokens != tokens_per_shard
    for name in ("mlp_in", "mlp_out"):
        group.create_array(
            name,
            shape=(total, n_layers, d_model),
            dtype=config.dtype,
            chunks=(chunk_tokens, n_layers, d_model),
            shards=(tokens_per_shard, n_layers, d_model) if sharded else None,
            compressors=None,
            dimension_names=("token", "layer", "d_model"),
        )
    for name, dtype in (("token_id", "int32"), ("lang", "int8"), ("position", "int16")):
        group.create_array(
            name,
            shape=(total,),
            dtype=dtype,
            chunks=(chunk_tokens,),
            shards=(tokens_per_shard,) if sharded else None,
            compressors=None,
            dimension_names=("token",),
        )
    group.create_array("shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs["format_version"] = STORE_FORMAT_VERSION  # last: marks the layout as complete
    return group


def write_shard(store: ActivationStore, shard: int, arrays: dict[str, np.ndarray]) -> None:
    rows = slice(shard * store.tokens_per_shard, (shard + 1) * store.tokens_per_shard)
    # Zarr by default compares every chunk with the fill value before writing it, to skip empty chunks: a
    # full extra pass over the data (writes were 2.5-4× slower), and activations are never all zero. The
    # setting is read when an array is opened, so the arrays are opened inside it.
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name, values in arrays.items():
            array = store.group[name]
            if not write_raw_chunk(array, shard, values):
                array[rows] = values
    store.group["shard_done"][shard] = 1  # last: the shard becomes visible only once complete


def write_raw_chunk(array: zarr.Array, index: int, values: np.ndarray) -> bool:
    """Write `values` as chunk `index` (along the first axis) of an uncompressed, unsharded array through
    Zarr's own store and chunk key: the chunk's encoding is then exactly its little-endian bytes, so the
    codec pipeline (a copy into a chunk buffer and another into bytes, ≈ 3× the write's time) is skipped.
    Returns False, writing nothing, when the array is encoded any other way (e.g. a sharded store of an
    older collection being resumed) or `values` is not exactly one chunk."""
    from zarr.codecs import BytesCodec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    metadata = array.metadata
    codecs = getattr(metadata, "codecs", ())
    chunk_shape = tuple(metadata.chunk_grid.chunk_shape)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec) or chunk_shape != values.shape:
        return False
    little_endian = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    key = f"{array.store_path.path}/{metadata.encode_chunk_key((index,) + (0,) * (values.ndim - 1))}"
    store = array.store_path.store
    if isinstance(store, zarr.storage.LocalStore) and write_direct(Path(store.root) / key, little_endian):
        return True
    buffer = default_buffer_prototype().buffer.from_bytes(memoryview(little_endian).cast("B"))
    sync(store.set(key, buffer))
    return True


def write_direct(path: Path, data: np.ndarray) -> bool:
    """Write `data`'s bytes to `path` around the page cache (O_DIRECT), through a temporary file renamed
    into place as Zarr's own writes are. Why: on this project's VMs a buffered write of 800 MB costs
    1–2 s of kernel CPU (page-cache copies and writeback), which on 2 cores comes straight out of the
    forward's time, while a direct write costs ≈ 0.08 s of CPU and waits on the disk instead
    (docs/performance.md §3). Returns False, writing nothing, where it cannot: no O_DIRECT (not Linux), a
    buffer not page-aligned (see `page_aligned_empty`), a size not a whole number of pages, or a
    filesystem that refuses direct I/O (some network filesystems, tmpfs before Linux 6.6)."""
    direct = getattr(os, "O_DIRECT", 0)
    view = memoryview(data).cast("B")
    if not direct or data.ctypes.data % mmap.PAGESIZE or view.nbytes % mmap.PAGESIZE or not view.nbytes:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
    except OSError:
        partial.unlink(missing_ok=True)
        return False
    try:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])
    except OSError:  # (e.g. EINVAL: the filesystem opened the file but refuses direct writes)
        partial.unlink(missing_ok=True)
        return False
    finally:
        os.close(fd)
    os.replace(partial, path)
    return True


def page_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose data starts on a page boundary (an anonymous mmap), so that
    `write_direct` can hand it to the disk without a copy."""
    count = math.prod(shape)
    block = mmap.mmap(-1, max(1, count * dtype.itemsize))  # (the tensor holds a reference to it)
    return torch.frombuffer(block, dtype=dtype, count=count).view(shape)


def norm_stats(store: ActivationStore, max_tokens: int = 50_000) -> dict:
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


def open_existing(url: str) -> ActivationStore | None:
    """The store at `url`, or None if there is none or its creation was interrupted (then it is recreated)."""
    try:
        group = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if "format_version" not in group.attrs:
        return None
    return ActivationStore(url)
