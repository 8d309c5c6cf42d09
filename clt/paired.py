"""Two models' activations on the same tokens, read as one store (for crosscoders, clt/crosscoder.py).

Each model's activations are collected into its own store by the ordinary collection
(clt/activations.py) with the same corpus, mixture, context, token count and seed — so the same token
blocks. `PairedStore` checks that token for token (ids, positions, languages, shard layout) and reads a
shard as `[tokens, models × sites, d]`: the chosen site (MLP output or input) of the chosen layers of
model A, then of model B. It has the store interface `StoreLoader` and the CLT training loop read
(`done_shards`, `tokens_per_shard`, `read_shard`, `url`), with the crosscoder's input as both the
"input" and the "output" (a crosscoder reconstructs what it reads).
"""

from __future__ import annotations

import numpy as np

from clt.store import ActivationStore
from training.errors import UserError

SITES = ("mlp_out", "mlp_in")


class PairedStoreMismatch(UserError):
    """The two stores do not hold the same tokens."""


class PairedStore:
    def __init__(self, store_a: ActivationStore, store_b: ActivationStore, site: str, layers: list[int]):
        if site not in SITES:
            raise UserError(f"site must be one of {SITES}, got {site!r}")
        bad = [l for l in layers if not 0 <= l < store_a.n_layers]
        if bad or not layers:
            raise UserError(f"layers {layers} out of range: the stores have {store_a.n_layers} layers")
        for name in ("n_layers", "d_model", "tokens_per_shard", "langs"):
            if getattr(store_a, name) != getattr(store_b, name):
                raise PairedStoreMismatch(
                    f"{store_a.url} and {store_b.url} differ in {name} ({getattr(store_a, name)} vs "
                    f"{getattr(store_b, name)}): collect both with the same settings"
                )
        if store_a.n_shards != store_b.n_shards:
            raise PairedStoreMismatch(
                f"{store_a.url} has {store_a.n_shards} shards, {store_b.url} {store_b.n_shards}: collect "
                "both with the same --n-tokens and blocks per shard"
            )
        self.a, self.b, self.site, self.layers = store_a, store_b, site, list(layers)
        self.url = f"{store_a.url} + {store_b.url}"
        self.tokens_per_shard = store_a.tokens_per_shard
        self.langs = store_a.langs
        self.d_model = store_a.d_model

    @property
    def done_shards(self) -> list[int]:
        return sorted(set(self.a.done_shards) & set(self.b.done_shards))

    @property
    def n_shards(self) -> int:
        return self.a.n_shards

    def read_shard(
        self, shard: int, fields: tuple[str, ...] = ("mlp_in", "mlp_out")
    ) -> dict[str, np.ndarray]:
        keys = ("token_id", "position", "lang")
        a = self.a.read_shard(shard, (self.site, *keys))
        b = self.b.read_shard(shard, (self.site, *keys))
        for key in keys:
            if not np.array_equal(a[key], b[key]):
                raise PairedStoreMismatch(
                    f"shard {shard}: {self.a.url} and {self.b.url} hold different tokens ({key} differs); "
                    "collect both stores with the same corpus, mixture, --collect-n-tokens and seed"
                )
        paired = np.concatenate([a[self.site][:, self.layers], b[self.site][:, self.layers]], axis=1)
        out = {"mlp_in": paired, "mlp_out": paired}
        out.update({key: a[key] for key in keys})
        return {name: out[name] for name in fields}

    def norm_scales(self) -> list[float]:
        """sqrt(d) / E‖x‖ per model × site, from each store's statistics of the site."""
        statistic = f"{self.site}_mean_norm"
        root_d = self.d_model**0.5
        return [
            root_d / store.attrs["norm_stats"][statistic][l]
            for store in (self.a, self.b)
            for l in self.layers
        ]
