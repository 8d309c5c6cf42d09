"""How often, and how strongly, units fire on each language's text — the one implementation.

A "unit" is anything with a per-token activation: an MLP neuron after the nonlinearity, a CLT feature,
an SAE latent. Its *firing share* in language k is the share of language-k tokens (BOS excluded) on
which its activation is > 0 — LAPE's p_k for neurons (Tang et al. 2024), the activation frequency of
language features (Lindsey et al. 2025; Harrasse et al. 2025). `FiringCounter` accumulates shares and
activation sums batch by batch; `firing_share` runs it over blocks of each language.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor


class FiringCounter:
    """Per [layer, unit, lang]: tokens where the unit fired and its summed activation."""

    def __init__(self, n_layers: int, n_units: int, langs: list[str]):
        self.langs = list(langs)
        self.fired = torch.zeros(n_layers, n_units, len(self.langs), dtype=torch.float64)
        self.total = torch.zeros(n_layers, n_units, len(self.langs), dtype=torch.float64)
        self.tokens = torch.zeros(len(self.langs), dtype=torch.float64)

    def add(self, lang: str, acts: Float[Tensor, "layer token unit"]) -> None:
        k = self.langs.index(lang)
        self.fired[:, :, k] += (acts > 0).sum(1).double().cpu()
        self.total[:, :, k] += acts.sum(1).double().cpu()
        self.tokens[k] += acts.shape[1]

    def _check(self) -> None:
        empty = [lang for lang, n in zip(self.langs, self.tokens.tolist()) if n == 0]
        if empty:
            raise ValueError(f"no tokens for languages {empty}")

    def frequency(self) -> Float[Tensor, "layer unit lang"]:
        """Share of each language's tokens on which the unit is > 0."""
        self._check()
        return (self.fired / self.tokens).float()

    def mean_activation(self) -> Float[Tensor, "layer unit lang"]:
        """Mean activation per token (silent tokens count as their value, e.g. 0 or a negative GELU)."""
        self._check()
        return (self.total / self.tokens).float()

    def strength(self) -> Float[Tensor, "layer unit lang"]:
        """Mean activation on the tokens where the unit fired (0 where it never fired)."""
        return torch.where(
            self.fired > 0, self.total / self.fired.clamp_min(1), torch.zeros_like(self.total)
        ).float()


@torch.no_grad()
def firing_counts(
    unit_activations: Callable[[Tensor], Tensor],
    blocks_by_lang: dict[str, Int[Tensor, "n pos"]],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> FiringCounter:
    """Run `unit_activations(ids) -> [layer, batch, pos, unit]` (BOS at position 0, dropped here) over
    every language's blocks and count."""
    counter = None
    for lang, blocks in blocks_by_lang.items():
        if len(blocks) == 0:
            raise ValueError(f"no text for language {lang!r}")
        for start in range(0, len(blocks), batch_size):
            acts = unit_activations(blocks[start : start + batch_size].to(device))[:, :, 1:]
            if counter is None:
                counter = FiringCounter(acts.shape[0], acts.shape[-1], list(blocks_by_lang))
            counter.add(lang, acts.flatten(1, 2))
    if counter is None:
        raise ValueError("no languages given")
    return counter


def firing_share(
    unit_activations: Callable[[Tensor], Tensor],
    blocks_by_lang: dict[str, Int[Tensor, "n pos"]],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> Float[Tensor, "layer unit lang"]:
    return firing_counts(unit_activations, blocks_by_lang, batch_size, device).frequency()
