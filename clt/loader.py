"""Batches of (MLP input, MLP output) activations for CLT training.

`StoreLoader` reads a Zarr store: each epoch visits the complete shards in a seeded random order,
keeps a buffer of `buffer_shards` shards, and draws batches from a seeded permutation of the buffer,
so every stored token is yielded exactly once per epoch and tokens from different shards mix.
The order is a pure function of (seed, epoch), so a resumed run skips the batches it already consumed.

`StreamingLoader` trains straight from the model, without a store: it runs the model on seeded
batches of token blocks and yields shuffled activations from a buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from clt.recorder import mlp_activations
from clt.store import ActivationStore
from training.errors import UserError

Batch = tuple[Float[Tensor, "batch layer d"], Float[Tensor, "batch layer d"]]


class StoreLoader:
    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int = 0,
        buffer_shards: int = 4,
        shards: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        done = set(store.done_shards)
        if not done:
            raise ValueError(f"activation store {store.url} has no complete shard: collect activations first")
        chosen = sorted(done if shards is None else set(shards))
        missing = sorted(set(chosen) - done)
        if missing:
            raise ValueError(f"shards {missing} of {store.url} are not complete")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.buffer_shards, self.drop_last = max(1, buffer_shards), drop_last
        # Each rank owns a disjoint subset of shards (DDP): together the ranks cover every token.
        self.shards = chosen[rank::world_size]
        if not self.shards:
            raise ValueError(f"rank {rank} of {world_size} gets no shard: the store has only {len(chosen)}")

    def tokens_per_epoch(self) -> int:
        return len(self.shards) * self.store.tokens_per_shard

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.tokens_per_epoch(), self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """Batches of epoch `epoch`; the first `skip_batches` are drawn but not yielded (resume)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        leftover_in = leftover_out = None
        produced = 0
        for start in range(0, len(order), self.buffer_shards):
            parts = [self.store.read_shard(s) for s in order[start : start + self.buffer_shards]]
            carried = [] if leftover_in is None else [leftover_in]
            inputs = np.concatenate(carried + [p["mlp_in"] for p in parts])
            outputs = np.concatenate(
                ([] if leftover_out is None else [leftover_out]) + [p["mlp_out"] for p in parts]
            )
            permutation = rng.permutation(len(inputs))
            n_full = len(inputs) // self.batch_size
            for b in range(n_full):
                if produced >= skip_batches:
                    rows = permutation[b * self.batch_size : (b + 1) * self.batch_size]
                    yield _to_tensors(inputs[rows], outputs[rows])
                produced += 1
            # Rows that do not fill a batch are carried into the next buffer, so none is lost.
            rest = permutation[n_full * self.batch_size :]
            leftover_in, leftover_out = inputs[rest], outputs[rest]
        if leftover_in is not None and len(leftover_in) and not self.drop_last and produced >= skip_batches:
            yield _to_tensors(leftover_in, leftover_out)

    def __iter__(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1


class RankUnionLoader:
    """The batches of several data-parallel ranks, concatenated: one process reproduces a W-rank DDP run.

    DDP averages the ranks' gradients of per-token-mean losses over equal batches, which equals the
    gradient of the mean over their union; so training on the union is the same optimisation, step for
    step (used to test DDP against one process). The ranks' epochs must have equal lengths."""

    def __init__(self, loaders: list[StoreLoader]):
        lengths = {loader.batches_per_epoch() for loader in loaders}
        if len(lengths) != 1 or any(loader.tokens_per_epoch() % loader.batch_size for loader in loaders):
            raise UserError(
                "emulated ranks need equal shard counts and batches that divide each rank's tokens: "
                "change --eval-shards or --batch-size"
            )
        self.loaders = loaders

    def batches_per_epoch(self) -> int:
        return self.loaders[0].batches_per_epoch()

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        for parts in zip(*(loader.epoch(epoch, skip_batches) for loader in self.loaders)):
            yield torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _to_tensors(inputs: np.ndarray, outputs: np.ndarray) -> Batch:
    return torch.from_numpy(np.ascontiguousarray(inputs)).float(), torch.from_numpy(
        np.ascontiguousarray(outputs)
    ).float()


class StreamingLoader:
    """Activations computed on the fly from `blocks` (BOS first), shuffled within a buffer of blocks."""

    def __init__(
        self,
        model,
        blocks: Int[Tensor, "blocks n_ctx"],
        batch_size: int,
        seed: int = 0,
        buffer_blocks: int = 64,
        forward_batch: int = 32,
        device: torch.device | None = None,
    ):
        self.model, self.blocks, self.batch_size, self.seed = model.eval(), blocks, batch_size, seed
        self.buffer_blocks, self.forward_batch = buffer_blocks, forward_batch
        self.device = device or next(model.parameters()).device

    def epoch(self, epoch: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(len(self.blocks), generator=generator)
        for start in range(0, len(order), self.buffer_blocks):
            chosen = self.blocks[order[start : start + self.buffer_blocks]]
            inputs, outputs = [], []
            for i in range(0, len(chosen), self.forward_batch):
                mlp_in, mlp_out = mlp_activations(
                    self.model, chosen[i : i + self.forward_batch].long().to(self.device)
                )
                inputs.append(rearrange(mlp_in[:, 1:], "b p l d -> (b p) l d").float().cpu())
                outputs.append(rearrange(mlp_out[:, 1:], "b p l d -> (b p) l d").float().cpu())
            inputs, outputs = torch.cat(inputs), torch.cat(outputs)
            permutation = torch.randperm(len(inputs), generator=generator)
            for b in range(0, len(inputs), self.batch_size):
                rows = permutation[b : b + self.batch_size]
                yield inputs[rows], outputs[rows]

    def __iter__(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1
