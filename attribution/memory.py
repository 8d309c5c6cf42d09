"""How much memory one attribution graph takes, estimated before any edge is computed.

The estimate is made once the forward pass has counted the active features (it costs well under 1% of
a run): what is already allocated is measured (this process's resident memory, or the GPU's allocated
bytes), and what the rest of the run allocates is counted from the shapes —

- the edge rows: the adjacency over all nodes, or, with a feature budget, the rows of the expanded
  features over every source (as |A|, with a bit per entry for the signs) plus the packed adjacency of
  the kept ones (both alive while packing);
- one batch of the transpose pass: gradients at every layer, attention transposes, contraction scores;
- pruning: the boolean edge mask and the streaming passes' blocks (attribution.prune.BLOCK_BYTES);

and the peak is the larger of the attribution and the pruning phase. A run that will not fit under
`max_memory` is refused with the estimate and the largest feature budget (or prompt length) that fits.
`benchmarks/bench_attribution.py` (its `ours-memory` worker) checks the estimate against the measured peak
across prompt lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from attribution.prune import BLOCK_BYTES
from training.errors import UserError

GB = 2**30


class MemoryBudgetError(UserError):
    """An attribution run whose estimated peak is over the memory it may use."""


def current_rss_bytes(device: torch.device | str | None = None) -> int:
    """What the process holds now: resident memory on the CPU (Linux), allocated bytes on a GPU."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # not Linux: the estimate then counts only what the run allocates


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory a run may use by default: the GPU's free memory, or MemAvailable plus what this process
    already holds (so that the default refuses what would push the machine into swap or the OOM killer)."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 + current_rss_bytes()
    return 2**62


def parse_bytes(text: str) -> int:
    """'24GB', '512MB', '1.5G', or a plain number of bytes."""
    units = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": GB, "GB": GB, "T": 2**40}
    stripped = text.strip().upper().replace("IB", "B")
    number = stripped.rstrip("KMGTB")
    unit = stripped[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a memory size: write e.g. 24GB or 512MB") from None
    if unit not in units or value <= 0:
        raise UserError(f"cannot read {text!r} as a memory size: write e.g. 24GB or 512MB")
    return int(value * units[unit])


@dataclass
class AttributionSize:
    """The shapes that decide an attribution run's memory."""

    n_pos: int
    n_layers: int
    d_model: int
    n_active: int
    n_targets: int
    budget: int  # features that get rows (n_active without a budget)
    batch_size: int
    max_group_slots: int  # most padded source slots in one group of a site's positions
    itemsize: int
    n_heads: int  # (the transpose pass keeps a rescaled copy of the attention patterns)

    @classmethod
    def of(
        cls, frozen, blocks, n_active: int, n_targets: int, budget: int, batch_size: int, dtype
    ) -> AttributionSize:
        return cls(
            n_pos=frozen.n_pos,
            n_layers=frozen.n_layers,
            d_model=frozen.W_U.shape[0],
            n_active=n_active,
            n_targets=n_targets,
            budget=budget,
            batch_size=batch_size,
            max_group_slots=max(max(b.padded_slots, default=0) for b in blocks),
            itemsize=torch.tensor([], dtype=dtype).element_size(),
            n_heads=frozen.n_heads,
        )

    @property
    def fixed_nodes(self) -> int:
        """Error, token and target nodes: in every graph whatever the budget."""
        return (self.n_layers + 1) * self.n_pos + self.n_targets

    def phases(self, budget: int | None = None) -> dict[str, int]:
        """Bytes each phase adds to what is allocated when the estimate is made."""
        k = self.budget if budget is None else budget
        s = self.itemsize
        nodes = k + self.fixed_nodes
        adjacency = nodes * nodes * s
        columns = self.n_active + self.fixed_nodes  # every source
        # (with the rows, their signs: a bit per entry while the rows hold |A|)
        rows = (k + self.n_targets) * (columns * s + -(-columns // 8)) if k < self.n_active else 0
        # (gradients at every layer plus the transposes' temporaries and a block's transposed copy; a
        # group's scores; the source-major rows the blocks add into)
        backward = (
            s
            * min(self.batch_size, max(k, self.n_targets))
            * (self.n_pos * self.d_model * (self.n_layers + 7) + self.max_group_slots + columns)
        )
        backward += self.n_layers * self.n_heads * self.n_pos**2 * s  # the rescaled patterns
        # the boolean edge mask, a streamed block's |A| and product (at most the matrix itself), the
        # error columns' |A| when scoring
        pruning = nodes * nodes + min(2 * BLOCK_BYTES, 2 * adjacency) + nodes * self.n_layers * self.n_pos * s
        return {
            "attribution": adjacency + rows + backward,
            "pruning": adjacency + pruning,
            "adjacency": adjacency,
            "edge rows": rows,
        }

    def peak_bytes(self, now: int, budget: int | None = None) -> int:
        phases = self.phases(budget)
        return now + max(phases["attribution"], phases["pruning"])

    def describe(self, estimate: int) -> str:
        phases = self.phases()
        nodes = self.budget + self.fixed_nodes
        budget = "all" if self.budget == self.n_active else f"{self.budget:,}"
        return (
            f"memory estimate: {estimate / GB:.2f} GB peak for {self.n_pos} tokens, {self.n_active:,} active "
            f"features (rows for {budget}), {nodes:,} nodes: adjacency {phases['adjacency'] / GB:.2f} GB"
            + (f", edge rows {phases['edge rows'] / GB:.2f} GB" if phases["edge rows"] else "")
        )

    def largest_budget_within(self, limit: int, now: int) -> int:
        """The most features that can get rows with the peak under `limit` (−1 if even none fit)."""
        if self.peak_bytes(now, self.n_active) <= limit:
            return self.n_active
        if self.peak_bytes(now, 0) > limit:
            return -1
        low, high = 0, self.n_active - 1
        while low < high:  # below n_active (where the row buffer is not needed) the peak grows with k
            middle = (low + high + 1) // 2
            if self.peak_bytes(now, middle) <= limit:
                low = middle
            else:
                high = middle - 1
        return low

    def refusal(self, estimate: int, limit: int, now: int) -> str:
        fits = self.largest_budget_within(limit, now)
        # The graph's size grows about with the square of the prompt length (features ∝ length).
        shorter = int(self.n_pos * math.sqrt(max(limit - now, 0) / max(estimate - now, 1)))
        hint = f"--max-feature-nodes {fits:,}" if fits > 0 else f"--max-tokens {max(shorter, 2)}"
        return (
            f"attributing this {self.n_pos}-token prompt needs ≈ {estimate / GB:.2f} GB, over the "
            f"{limit / GB:.2f} GB allowed (--max-memory): rerun with {hint.replace(',', '')}"
            + (f" (or --max-tokens ≈ {max(shorter, 2)})" if fits > 0 else "")
        )
