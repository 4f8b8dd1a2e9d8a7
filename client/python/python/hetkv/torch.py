"""PyTorch embedding modules over a hetkv cache.

``Embedding`` and ``EmbeddingBag`` replace ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``
for tables that live in hetkv. Forward looks the batch's unique keys up in the cache (within its
read bound, with this worker's own updates in them) and puts the rows on the input's device;
backward sums the gradient rows per unique key and hands them to ``Cache.update``, so the
table's optimizer runs on the shards (as TorchRec's fused optimizers, PERSIA and TFRA do). The
module holds no parameter and no dense gradient of the table: give the torch optimizer the rest
of the model only.

>>> import hetkv, hetkv.torch, torch
>>> cluster = hetkv.EmbeddedCluster(shards=2)
>>> table = cluster.create_table("ids", rows=10_000, dim=16,
...                              init=hetkv.Initializer.normal(std=0.01),
...                              optimizer=hetkv.Optimizer.sgd(lr=0.05))
>>> emb = hetkv.torch.Embedding(table.cached(capacity=0.1))   # was: torch.nn.Embedding(10_000, 16)
>>> out = emb(torch.tensor([[1, 2], [2, 3]]))                    # (2, 2, 16)
>>> out.sum().backward()                                         # updates rows 1, 2 and 3
>>> cluster.close()

torch is imported here, at run time: the hetkv wheel does not link libtorch.
"""

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._hetkv import Cache

__all__ = ["Embedding", "EmbeddingBag"]


class _Rows(torch.autograd.Function):
    """The rows of ``keys`` from ``cache``: forward looks them up, backward pushes their
    gradient rows (one update per unique key) through ``cache.update``."""

    @staticmethod
    def forward(ctx, anchor, cache, keys, device):  # type: ignore[override]
        ctx.cache = cache
        ctx.keys = keys
        return _lookup(cache, keys, device)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        rows = grad.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        ctx.cache.update(ctx.keys, rows)
        return None, None, None, None


def _lookup(cache: Cache, keys: np.ndarray, device: torch.device) -> torch.Tensor:
    """The rows of ``keys`` on ``device``. For a GPU they are written straight into pinned host
    memory (PyTorch's caching host allocator keeps the block until the copy is done) and copied
    without blocking the host."""
    if device.type == "cuda":
        staged = torch.empty((len(keys), cache.dim), dtype=torch.float32, pin_memory=True)
        cache.lookup(keys, out=staged.numpy())
        return staged.to(device, non_blocking=True)
    return torch.from_numpy(cache.lookup(keys)).to(device)


def _unique(input: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
    """The unique keys of ``input`` as uint64 (for the cache) and each element's index among
    them (on the input's device)."""
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"keys must be an integer tensor (int64 or int32), not {input.dtype}")
    flat = input.reshape(-1)
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    # An int64 key is its u64 bit pattern (a raw 64-bit feature id above 2^63 is negative in
    # torch): a dynamic table takes any; a fixed table names a key outside it.
    keys = uniq.to("cpu", torch.int64).numpy().view(np.uint64)
    return keys, inverse


class _CacheModule(nn.Module):
    def __init__(self, cache: Cache, device: Optional[torch.device] = None):
        super().__init__()
        if not isinstance(cache, Cache):
            raise TypeError(f"expected a hetkv.Cache (Table.cached(...)), not {type(cache).__name__}")
        self.cache = cache
        self.embedding_dim = cache.dim
        self.device = None if device is None else torch.device(device)

    def _out_device(self, input: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else input.device

    def _rows(self, keys: np.ndarray, device: torch.device) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            # A leaf that requires grad, so that autograd calls _Rows.backward; the module
            # itself has no parameter.
            anchor = torch.empty(0, requires_grad=True)
            return _Rows.apply(anchor, self.cache, keys, device)
        return _lookup(self.cache, keys, device)

    def flush(self) -> None:
        """Pushes every update the cache holds (before a checkpoint or evaluation elsewhere)."""
        self.cache.flush()

    def extra_repr(self) -> str:
        return f"table={self.cache.table!r}, embedding_dim={self.embedding_dim}"


class Embedding(_CacheModule):
    """``torch.nn.Embedding`` over a hetkv cache: ``forward(input)`` maps an integer tensor of
    any shape to its rows, shape ``input.shape + (dim,)``, on ``device`` (the input's when None).

    Keys on the CPU with ``device="cuda"`` is the quick way to feed a GPU model (as TorchRec
    keeps its keys on the host): the keys never cross to the GPU and back."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        device = self._out_device(input)
        keys, inverse = _unique(input)
        rows = self._rows(keys, device)
        return F.embedding(inverse.to(device), rows).reshape(*input.shape, self.embedding_dim)


class EmbeddingBag(_CacheModule):
    """``torch.nn.EmbeddingBag`` over a hetkv cache, ``mode`` "sum" or "mean".

    ``forward(input, offsets=None, per_sample_weights=None)`` takes bags as
    ``torch.nn.EmbeddingBag`` does: a 2-D input (one bag per row), or a 1-D input with
    ``offsets`` (where each bag starts)."""

    def __init__(self, cache: Cache, mode: str = "mean", device: Optional[torch.device] = None):
        super().__init__(cache, device)
        if mode not in ("sum", "mean"):
            raise ValueError(f'mode must be "sum" or "mean", not {mode!r}')
        self.mode = mode

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        device = self._out_device(input)
        keys, inverse = _unique(input)
        rows = self._rows(keys, device)
        inverse = inverse.reshape(input.shape).to(device)
        return F.embedding_bag(
            inverse,
            rows,
            None if offsets is None else offsets.to(device),
            mode=self.mode,
            per_sample_weights=None if per_sample_weights is None else per_sample_weights.to(device),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"
