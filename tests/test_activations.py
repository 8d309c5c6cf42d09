"""Zarr activation store and loaders."""

import json
import subprocess

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from clt.activations import CollectConfig, collect_activations
from clt.loader import StoreLoader, StreamingLoader
from clt.recorder import mlp_activations
from clt.store import ActivationStore
from tests.conftest import PYTHON, REPO, collect_args, kill_when, run_torchrun, script_env


def test_store_layout_and_values(tiny_store, tiny_model_dir):
    store = tiny_store
    assert store.is_complete() and store.n_shards >= 8
    assert (store.n_layers, store.d_model) == (2, 32)
    assert store.tokens_per_shard == 16 * 15
    assert store.mlp_in.shape == (store.n_shards * store.tokens_per_shard, 2, 32)
    assert store.attrs["input_hook"] == "blocks.{layer}.ln2.hook_normalized" and store.langs == [
        "de",
        "en",
        "fr",
    ]
    # Sharding codec in the array metadata (Zarr v3).
    codecs = json.dumps(store.group["mlp_in"].metadata.to_dict()["codecs"])
    assert "sharding_indexed" in codecs
    # Stored values are the model's ln_2 / mlp outputs for those tokens.
    data = store.read_shard(0, ("mlp_in", "mlp_out", "token_id", "position"))
    assert data["position"][:15].tolist() == list(range(1, 16))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[model.config.bos_token_id] + data["token_id"][:15].tolist()])
    mlp_in, mlp_out = mlp_activations(model, ids)
    np.testing.assert_allclose(data["mlp_in"][:15], mlp_in[0, 1:].numpy(), atol=2e-3, rtol=1e-2)
    np.testing.assert_allclose(data["mlp_out"][:15], mlp_out[0, 1:].numpy(), atol=2e-3, rtol=1e-2)
    in_scale, out_scale = store.norm_scales()
    assert len(in_scale) == 2 and all(s > 0 for s in in_scale + out_scale)


def rows_of(batches) -> np.ndarray:
    inputs = np.concatenate([x.numpy().reshape(len(x), -1) for x, _ in batches])
    return inputs[np.lexsort(inputs.T[::-1])]


def test_loader_yields_every_token_exactly_once_per_epoch(tiny_store):
    stored = tiny_store.group["mlp_in"][:].astype(np.float32).reshape(tiny_store.mlp_in.shape[0], -1)
    stored = stored[np.lexsort(stored.T[::-1])]
    loader = StoreLoader(tiny_store, batch_size=100, seed=3, buffer_shards=3)
    epoch = list(loader.epoch(0))
    assert len(epoch) == loader.batches_per_epoch()
    np.testing.assert_array_equal(rows_of(epoch), stored)
    # Two DDP ranks together cover the store exactly once, without overlap.
    per_rank = [list(StoreLoader(tiny_store, 100, seed=3, rank=r, world_size=2).epoch(0)) for r in (0, 1)]
    np.testing.assert_array_equal(rows_of(per_rank[0] + per_rank[1]), stored)
    # Batches mix shards, and epochs are reshuffled.
    assert not torch.equal(epoch[0][0], list(loader.epoch(1))[0][0])


def test_loader_resume_skips_exactly_the_consumed_batches(tiny_store):
    loader = StoreLoader(tiny_store, batch_size=70, seed=1, buffer_shards=2)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, skip_batches=5))
    assert len(resumed) == len(full) - 5
    for (a, _), (b, _) in zip(full[5:], resumed):
        assert torch.equal(a, b)


def test_incomplete_shards_are_never_read(tiny_store, tmp_path):
    # Copy the store, then un-mark one shard as if a writer had been killed while writing it.
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store.url, copy)
    zarr.open_group(str(copy), mode="r+")["shard_done"][2] = 0
    store = ActivationStore(copy)
    assert 2 not in store.done_shards and not store.is_complete()
    with pytest.raises(ValueError, match="not complete and must not be read"):
        store.read_shard(2)
    loader = StoreLoader(store, batch_size=50)
    assert loader.tokens_per_epoch() == (store.n_shards - 1) * store.tokens_per_shard
    zarr.open_group(str(copy), mode="r+")["shard_done"][:] = 0
    with pytest.raises(ValueError, match="no complete shard"):
        StoreLoader(ActivationStore(copy), batch_size=50)


def test_collection_resumes_after_a_real_kill(tiny_store, tiny_model_dir, real_slice_corpus_dir, tmp_path):
    store_path = tmp_path / "killed.zarr"
    args = []
    for key, value in collect_args(tiny_model_dir, store_path, real_slice_corpus_dir).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    args += ["--batch-size", "1"]  # slow the writer down so the kill lands mid-collection
    process = subprocess.Popen(
        [PYTHON, str(REPO / "scripts" / "collect_activations.py")] + args,
        env=script_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def shards_done() -> int:
        try:
            return int(np.sum(zarr.open_group(str(store_path), mode="r")["shard_done"][:]))
        except Exception:  # noqa: BLE001 - the store may not exist yet, or be mid-creation
            return 0

    kill_when(process, shards_done, 2)
    partial = ActivationStore(store_path)
    assert not partial.is_complete()
    resumed = collect_activations(
        CollectConfig(**collect_args(tiny_model_dir, store_path, real_slice_corpus_dir))
    )
    assert resumed.is_complete()
    for name in ("mlp_in", "mlp_out", "token_id", "lang"):
        np.testing.assert_array_equal(resumed.group[name][:], tiny_store.group[name][:])
    assert resumed.attrs["norm_stats"] == tiny_store.attrs["norm_stats"]


def test_store_from_another_model_is_refused(tiny_store, tiny_model_dir, real_slice_corpus_dir, tmp_path):
    other = tmp_path / "other_model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    model.save_pretrained(other)
    with pytest.raises(ValueError, match="was collected from .* not from"):
        tiny_store.check_model(other)
    with pytest.raises(ValueError, match=r"another model or config \(.*n_ctx: 16 → 12"):
        collect_activations(
            CollectConfig(
                **{**collect_args(tiny_model_dir, tiny_store.url, real_slice_corpus_dir), "n_ctx": 12}
            )
        )
    with pytest.raises(FileNotFoundError, match="collect one with"):
        ActivationStore(tmp_path / "missing.zarr")


def test_streaming_loader_matches_model_activations(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = torch.randint(2, 500, (6, 10))
    blocks[:, 0] = 1
    loader = StreamingLoader(model, blocks, batch_size=16, seed=0, buffer_blocks=6)
    batches = list(loader.epoch(0))
    assert sum(len(x) for x, _ in batches) == 6 * 9
    mlp_in, _ = mlp_activations(model, blocks)
    expected = mlp_in[:, 1:].reshape(54, -1).numpy()
    np.testing.assert_allclose(rows_of(batches), expected[np.lexsort(expected.T[::-1])], rtol=1e-6)


def test_two_torchrun_writers_fill_disjoint_shards_identically(
    tiny_store, tiny_model_dir, real_slice_corpus_dir, tmp_path
):
    store_path = tmp_path / "ddp.zarr"
    args = []
    for key, value in collect_args(tiny_model_dir, store_path, real_slice_corpus_dir).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    run_torchrun("collect_activations.py", args)
    store = ActivationStore(store_path)
    assert store.is_complete()
    # Every token lands in the same row as with one writer: the bookkeeping is exact.
    for name in ("token_id", "lang", "position"):
        np.testing.assert_array_equal(store.group[name][:], tiny_store.group[name][:])
    # The activations agree to the stored precision. Not bit for bit: the two ranks (torchrun gives each
    # one thread) and the one-process reference compute float32 GEMMs with different reduction orders.
    # That moves a value by a few float32 ulps *of its row's scale* (a dot product's rounding error is
    # relative to the sum of its terms, not to the result), so after rounding to fp16 a value differs by
    # at most one fp16 step at its own magnitude plus one at its row's largest magnitude — the second term
    # matters for values near zero, where fp16 steps are tiny (seen in 1 of 8 soak rounds). A misplaced
    # token or a wrong layer would differ by the row's scale itself.
    for name in ("mlp_in", "mlp_out"):
        ours, reference = store.group[name][:], tiny_store.group[name][:]
        value_step = np.spacing(np.maximum(np.abs(ours), np.abs(reference)))
        row_step = np.spacing(np.abs(reference).max(axis=-1, keepdims=True))
        gap = np.abs(ours.astype(np.float32) - reference.astype(np.float32))
        allowed = value_step.astype(np.float32) + row_step.astype(np.float32)
        worst = float((gap / allowed).max())
        assert worst <= 1.0, f"{name}: a value differs by {worst:.2f}× one fp16 step at its value + its row's"
        assert (gap > 0).mean() < 0.01, f"{name}: {(gap > 0).mean():.2%} of values differ"


def test_store_at_an_fsspec_url(tiny_model_dir, real_slice_corpus_dir):
    url = "memory://stores/tiny.zarr"  # any fsspec URL: memory here, s3:// or gs:// for large runs
    store = collect_activations(
        CollectConfig(**{**collect_args(tiny_model_dir, url, real_slice_corpus_dir), "n_tokens": 600})
    )
    assert store.is_complete() and store.url == url
    batches = list(StoreLoader(ActivationStore(url), batch_size=64).epoch(0))
    assert sum(len(x) for x, _ in batches) == store.n_shards * store.tokens_per_shard


def test_one_chunk_per_shard_is_written_raw_and_reads_as_zarr_would_write_it(
    tiny_store, tiny_model_dir, real_slice_corpus_dir, tmp_path
):
    """The default layout (no blocks_per_chunk): plain chunks written as raw bytes by write_raw_chunk. The
    files must be byte for byte what Zarr's own encoder writes, and hold the sharded store's values."""
    from clt.store import write_raw_chunk
    from training.errors import CorruptData

    args = {
        **collect_args(tiny_model_dir, tmp_path / "plain.zarr", real_slice_corpus_dir),
        "blocks_per_chunk": None,
    }
    store = collect_activations(CollectConfig(**args))
    assert [c["name"] for c in store.group["mlp_in"].metadata.to_dict()["codecs"]] == ["bytes"]
    for shard in (0, store.n_shards - 1):  # the same tokens, the same values as the sharded layout's
        plain, sharded = (
            store.read_shard(shard, ("mlp_in", "token_id")),
            tiny_store.read_shard(shard, ("mlp_in", "token_id")),
        )
        np.testing.assert_array_equal(plain["mlp_in"], sharded["mlp_in"])
        np.testing.assert_array_equal(plain["token_id"], sharded["token_id"])

    # Zarr's encoder and the raw write give identical chunk files, for every dtype the store holds.
    reference = zarr.open_group(tmp_path / "reference.zarr", mode="w")
    for name in ("mlp_in", "mlp_out", "token_id", "lang", "position"):
        source = store.group[name]
        values = source[: store.tokens_per_shard]
        encoded = reference.create_array(
            name, shape=source.shape, dtype=source.dtype, chunks=source.chunks, compressors=None
        )
        with zarr.config.set({"array.write_empty_chunks": True}):
            encoded[: store.tokens_per_shard] = values
        key = "/".join(["c", "0"] + ["0"] * (values.ndim - 1))
        assert (tmp_path / "plain.zarr" / name / key).read_bytes() == (
            tmp_path / "reference.zarr" / name / key
        ).read_bytes()
    # Anything but one whole uncompressed chunk goes through Zarr's own write.
    assert not write_raw_chunk(tiny_store.group["mlp_in"], 0, tiny_store.read_shard(0)["mlp_in"])  # sharded
    assert not write_raw_chunk(
        store.group["mlp_in"], 0, store.read_shard(0)["mlp_in"][:10]
    )  # part of a chunk

    # A truncated chunk (a full disk) is caught when read, as a damaged shard is.
    chunk = tmp_path / "plain.zarr" / "mlp_in" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CorruptData, match="shard 1 of"):
        ActivationStore(tmp_path / "plain.zarr").read_shard(1)


def test_fill_shards_writer_thread_stores_what_inline_writes_store(
    tiny_store, tiny_model_dir, real_slice_corpus_dir, tmp_path
):
    # The shard loop's three modes (benchmarks/bench_clt.py times them against each other): "thread" must
    # store exactly what collection's inline writes stored, "none" must store nothing.
    from clt.activations import collection_blocks, fill_shards
    from clt.store import create_store
    from training.corpus.build import load_corpus
    from training.fingerprint import model_fingerprint
    from training.mixtures import parse_mixture
    from training.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(real_slice_corpus_dir))["train"]
    blocks, block_langs = collection_blocks(
        tokenizer,
        list(corpus["text"]),
        list(corpus["lang"]),
        parse_mixture(tiny_store.attrs["mixture"]),
        3000,
        16,
        0,
    )
    lang_index = {lang: i for i, lang in enumerate(tiny_store.langs)}
    shards = list(range(tiny_store.n_shards))
    for writes in ("thread", "none"):
        config = CollectConfig(
            **collect_args(tiny_model_dir, tmp_path / f"{writes}.zarr", real_slice_corpus_dir)
        )
        create_store(
            config, model, tokenizer, len(blocks), tiny_store.langs, model_fingerprint(str(tiny_model_dir))
        )
        target = ActivationStore(config.store, writable=True)
        fill_shards(
            model,
            blocks,
            block_langs,
            lang_index,
            shards,
            config,
            target if writes == "thread" else None,
            writes,
        )
        written = ActivationStore(config.store)
        if writes == "none":
            assert written.done_shards == []
            continue
        assert sorted(written.done_shards) == shards
        for shard in (0, shards[-1]):
            fields = ("mlp_in", "mlp_out", "token_id", "lang", "position")
            ours, theirs = written.read_shard(shard, fields), tiny_store.read_shard(shard, fields)
            for name in fields:
                np.testing.assert_array_equal(ours[name], theirs[name])
    with pytest.raises(ValueError, match="thread, inline or none"):
        fill_shards(model, blocks, block_langs, lang_index, shards, config, None, "async")


def test_direct_writes_give_zarr_s_chunk_files_and_decline_what_they_cannot_write(tmp_path, monkeypatch):
    """A page-aligned whole chunk goes to disk with O_DIRECT (store.write_direct); its file is byte for
    byte the one Zarr's own write gives for the same values, and the array reads it back. Unaligned or
    partial-page data are declined with nothing written (write_raw_chunk then uses Zarr's write)."""
    import mmap

    from clt import store as store_module

    direct_writes = []
    real_write_direct = store_module.write_direct

    def spy(path, data):
        written = real_write_direct(path, data)
        direct_writes.append(written)
        return written

    monkeypatch.setattr(store_module, "write_direct", spy)
    aligned = store_module.page_aligned_empty((1024, 4, 8), torch.float16)  # 64 KiB: 16 whole pages
    aligned.copy_(torch.randn(1024, 4, 8, generator=torch.Generator().manual_seed(0)))
    values = aligned.numpy()
    assert values.ctypes.data % mmap.PAGESIZE == 0
    unaligned = np.empty(values.size + 1, dtype=values.dtype)[1:].reshape(values.shape)  # starts 2 bytes in
    unaligned[...] = values
    files = {}
    for name, data in (("direct", values), ("zarr", unaligned)):
        group = zarr.open_group(tmp_path / f"{name}.zarr", mode="w")
        array = group.create_array(
            "x", shape=(2048, 4, 8), dtype="float16", chunks=(1024, 4, 8), compressors=None
        )
        assert store_module.write_raw_chunk(array, 1, data)
        np.testing.assert_array_equal(zarr.open_group(tmp_path / f"{name}.zarr")["x"][1024:], values)
        chunks = tmp_path / f"{name}.zarr" / "x" / "c"
        files[name] = sorted(str(p.relative_to(chunks)) for p in chunks.rglob("*") if p.is_file())
        files[f"{name} bytes"] = (tmp_path / f"{name}.zarr" / "x" / "c" / "1" / "0" / "0").read_bytes()
    # The aligned chunk went the direct way wherever this filesystem takes O_DIRECT (Linux ext4: yes).
    assert direct_writes == [takes_direct_io(tmp_path), False]
    assert files["direct bytes"] == files["zarr bytes"] == values.tobytes()
    assert files["direct"] == files["zarr"] == ["1/0/0"]  # no temporary file left behind
    # Declined, nothing written: a start off the page boundary, a size that is not whole pages.
    assert not real_write_direct(tmp_path / "offset", values[1:])
    assert not real_write_direct(tmp_path / "short", values[:1000])
    assert not (tmp_path / "offset").exists() and not (tmp_path / "short").exists()


def takes_direct_io(directory) -> bool:
    import os

    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (directory / "probe").unlink(missing_ok=True)
    return True
