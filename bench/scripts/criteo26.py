"""Criteo's 26 categorical fields as the torch benchmarks model them: each a table of its
field's cardinality (capped), dim 16 above 1,000 ids and 8 below, one id a field a sample drawn
skewed (``rows * u^3``), as a ``KeyedJaggedTensor`` (one id a bag)."""

import torch

from hetkv.torch import KeyedJaggedTensor

# Criteo Kaggle's 26 categorical fields: distinct ids of each.
CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
NAMES = [f"C{i + 1}" for i in range(26)]


def fields(cap: int):
    """Each field's table rows (its cardinality, capped at ``cap``) and dim."""
    rows = [min(c, cap) for c in CARDINALITIES]
    dims = [16 if c > 1000 else 8 for c in CARDINALITIES]
    return rows, dims


def sparse_batch(rows, batch: int, gen: torch.Generator) -> KeyedJaggedTensor:
    """One skewed id a field a sample."""
    ids = torch.stack([(r * torch.rand(batch, generator=gen).pow(3)).long() for r in rows])
    return KeyedJaggedTensor.from_lengths_sync(
        NAMES, ids.reshape(-1), torch.ones(26 * batch, dtype=torch.int64)
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
