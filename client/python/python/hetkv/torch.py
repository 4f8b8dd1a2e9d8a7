"""PyTorch embedding modules over a hetkv cache.

``Embedding`` and ``EmbeddingBag`` replace ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``
for tables that live in hetkv. Forward looks the batch's unique keys up in the cache (within its
read bound, with this worker's own updates in them) and puts the rows on the input's device;
backward sums the gradient rows per unique key, and the table's optimizer runs on the shards.

When the rows step is torch's: at ``EmbeddingOptimizer.step()``, as ``torch.nn.Embedding``'s
weight steps at its optimizer's step (``update="step"``, the default). Backward accumulates each
key's gradient into the module's ``grad_carrier``, a sparse leaf of no memory, across as many
backward passes as come before the step, so gradient accumulation over micro-batches makes one
step of their sum, and ``torch.amp.GradScaler`` unscales those gradients and skips the step when
one is not finite, as it does for the dense part (``scaler.step(embedding_optimizer)``).
``update="backward"`` is the fused alternative (TorchRec's default, and PERSIA's and TFRA's): each
backward hands its gradients to ``Cache.update`` at once, and no optimizer is needed. Either way
the module holds no parameter and no dense gradient of the table: give the torch optimizer the
rest of the model only (``model.parameters()`` does not include the carriers).

The arguments of ``torch.nn`` users reach for are taken: ``padding_idx`` (the padding key reads
as zeros, is left out of bags and of their mean's count, and is never looked up or updated),
``max_norm`` and ``norm_type`` (rows returned with a larger norm are scaled down to it, and the
gradient is taken as torch takes it, through the renormalized row; the rows on the shards are not
rewritten, where torch rewrites its weight in place), ``EmbeddingBag``'s ``mode="max"``,
``include_last_offset`` and ``per_sample_weights``, and bf16 or fp16 outputs: ``.half()``,
``.bfloat16()`` and ``.to(dtype)`` set the dtype the rows come out in (the cache and the
gradients pushed stay f32).

>>> import hetkv, hetkv.torch, torch
>>> cluster = hetkv.EmbeddedCluster(shards=2)
>>> table = cluster.create_table("ids", rows=10_000, dim=16,
...                              init=hetkv.Initializer.normal(std=0.01),
...                              optimizer=hetkv.Optimizer.sgd(lr=0.05))
>>> emb = hetkv.torch.Embedding(table.cached(capacity=0.1))   # was: torch.nn.Embedding(10_000, 16)
>>> opt = hetkv.torch.EmbeddingOptimizer(emb)                    # the tables' own optimizers
>>> out = emb(torch.tensor([[1, 2], [2, 3]]))                    # (2, 2, 16)
>>> out.sum().backward()
>>> opt.step(); opt.zero_grad()                                  # updates rows 1, 2 and 3
>>> cluster.close()

``state_dict()`` holds each table's rows as ``nn.Embedding`` holds its weight (``weight``, and
``keys`` for a dynamic table; a collection's under ``embedding_bags.{table}.`` or
``embeddings.{table}.``, as TorchRec's), read from the shards after the cache's updates are
pushed, so ``torch.save(model.state_dict())`` saves the model with its tables; every rank that
calls it reads every table, so save on one. ``load_state_dict`` sets the rows on the shards (each
row's optimizer state stays, as a torch optimizer's stays when its model's weights load) and
makes the caches read them again. The shards' optimizer state is the embedding optimizer's:
``EmbeddingOptimizer.state_dict()`` carries it and ``load_state_dict`` sets it, so a run resumed
from both state dicts starts from the saved rows and state (at bounds 0 it then trains on bit for
bit as the saved run would have; above 0 its caches start empty, so their staleness differs). ``torch.save(model)`` and
``copy.deepcopy`` are refused with the reason (a cache is a connection, not a value).

torch is imported here, at run time: the hetkv wheel does not link libtorch.
"""

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._hetkv import Cache, lookup_many, prefetch_many, update_many
from ._jagged import JaggedTensor, KeyedJaggedTensor, KeyedTensor, _features, _spans

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "EmbeddingOptimizer",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "TrainPipeline",
]

# Rows a step's carrier can name: positions in the step's key table, not keys (a dynamic
# table's keys are any u64, beyond a sparse index).
_CARRIER_ROWS = 2**31 - 1


class _Rows(torch.autograd.Function):
    """The rows of ``keys`` from ``module``'s cache: forward looks them up; backward hands their
    gradient rows (one per unique key) to ``cache.update`` (``update="backward"``), or returns
    them as the sparse gradient of the module's carrier, which autograd accumulates until the
    step (``update="step"``)."""

    @staticmethod
    def forward(ctx, carrier, module, keys, device):  # type: ignore[override]
        ctx.module = module
        ctx.keys = keys
        return _lookup(module.cache, keys, device)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        m = ctx.module
        rows = grad.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if m.update == "backward":
            m.cache.update(ctx.keys, rows.numpy())
            return None, None, None, None
        return m._carrier_grad(ctx.keys, rows), None, None, None


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


class _StepGrads:
    """One table's gradients of ``update="step"`` between two steps: a carrier (a leaf of no
    memory, one row of zeros expanded, not a parameter, so that ``model.parameters()`` and the
    dense optimizer never see it) whose sparse gradient autograd accumulates, its rows positions
    in the step's key table."""

    def __init__(self, dim: int):
        self.dim = dim
        self.carrier = torch.zeros(1, dim).expand(_CARRIER_ROWS, dim).requires_grad_()
        self.keys = np.empty(0, dtype=np.uint64)

    def grad(self, keys: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (the gradients of unique ``keys``) as a sparse gradient of the carrier: at
        each key's position in the step's key table, which takes the keys it has not seen."""
        known = self.keys
        if len(known) == 0:
            self.keys = keys.copy()
            positions = np.arange(len(keys), dtype=np.int64)
        else:
            new = keys[~np.isin(keys, known, assume_unique=True)]
            known = self.keys = np.concatenate([known, new])
            order = np.argsort(known, kind="stable")
            positions = order[np.searchsorted(known, keys, sorter=order)].astype(np.int64)
        if len(self.keys) > _CARRIER_ROWS:
            raise RuntimeError(f"more than {_CARRIER_ROWS} keys between two steps")
        index = torch.from_numpy(positions).unsqueeze(0)
        return torch.sparse_coo_tensor(
            index, rows, (_CARRIER_ROWS, self.dim), check_invariants=False
        )

    def pending(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """The keys and summed gradient rows accumulated since the last ``clear`` (each key
        once: one optimizer step on the shards, whatever the passes); None when there are none."""
        grad = self.carrier.grad
        if grad is None:
            return None
        grad = grad.coalesce()
        positions = grad.indices()[0].numpy()
        if len(positions) == 0:
            return None
        rows = grad.values().to(torch.float32).contiguous().numpy()
        return self.keys[positions], rows

    def clear(self) -> None:
        self.carrier.grad = None
        self.keys = np.empty(0, dtype=np.uint64)


def _save_table(cache: Cache, destination, prefix: str) -> None:
    """The table of ``cache`` into a state dict, as ``nn.Embedding`` puts its weight there: its
    updates pushed first, then every row read from the shards (``{prefix}weight``, float32,
    rows x dim) and, for a dynamic table, the held keys beside them (``{prefix}keys``, int64:
    each u64 id's bit pattern)."""
    cache.flush()
    got = cache.source_table.read_rows()
    destination[prefix + "weight"] = torch.from_numpy(got["embeddings"])
    if cache.source_table.dynamic is not None:
        destination[prefix + "keys"] = torch.from_numpy(got["keys"].view(np.int64))


def _load_table(cache: Cache, state_dict, prefix: str, missing_keys, unexpected_keys, error_msgs) -> None:
    """Sets the table of ``cache`` from a state dict that ``_save_table`` made: this cache's
    updates are pushed first, then the rows are set on the shards (``Table.assign`` with
    ``keep_state=True``: each row's version moves on by one, and its optimizer state stays as it
    is, as a torch optimizer's state stays when its model's weights are loaded; the optimizer's
    state comes with ``EmbeddingOptimizer.load_state_dict``), then the cache forgets its lines,
    so that its next lookups read the rows loaded. A dynamic table gets the saved keys' rows;
    keys admitted since the save stay."""
    table = cache.source_table
    weight_key, keys_key = prefix + "weight", prefix + "keys"
    dynamic = table.dynamic is not None
    for k in state_dict:
        if k.startswith(prefix) and k not in (weight_key, keys_key) and "." not in k[len(prefix):]:
            unexpected_keys.append(k)
    if weight_key not in state_dict or (dynamic and keys_key not in state_dict):
        missing_keys.extend(k for k in (weight_key, keys_key)[: 1 + dynamic] if k not in state_dict)
        return
    weight = state_dict[weight_key].detach().to("cpu", torch.float32).contiguous()
    if dynamic:
        keys = state_dict[keys_key].detach().to("cpu", torch.int64).contiguous().numpy().view(np.uint64)
    else:
        keys = np.arange(table.rows, dtype=np.uint64)
    if tuple(weight.shape) != (len(keys), table.dim):
        error_msgs.append(
            f"size mismatch for {weight_key}: copying a param with shape {tuple(weight.shape)}, "
            f"the table {table.name!r} takes ({len(keys)}, {table.dim})"
        )
        return
    cache.flush()
    if len(keys):
        table.assign(keys, weight.numpy(), keep_state=True)
    cache.invalidate()


# A table's optimizer state in ``EmbeddingOptimizer.state_dict()``, under the names of torch's own
# optimizers (``torch.optim.Adagrad``'s ``sum``, ``torch.optim.Adam``'s ``exp_avg``, ``exp_avg_sq``
# and ``step``), one row a key: row-wise Adagrad's ``sum`` is keys x 1.


def _save_state(cache: Cache) -> Optional[Dict[str, torch.Tensor]]:
    """The optimizer state of the table of ``cache`` (None for SGD, which has none), its updates
    pushed first: every row's (a dynamic table's held keys, with ``keys``), read with the rows
    under each row's lock (``Table.read_rows(state=True)``)."""
    table = cache.source_table
    if table.optimizer.state_len(table.dim) == 0:
        return None
    cache.flush()
    got = table.read_rows(state=True)
    state = got["state"]
    out: Dict[str, torch.Tensor] = {}
    if table.dynamic is not None:
        out["keys"] = torch.from_numpy(got["keys"].view(np.int64))
    if table.optimizer.has_steps:
        dim = table.dim
        out["exp_avg"] = torch.from_numpy(np.ascontiguousarray(state[:, :dim]))
        out["exp_avg_sq"] = torch.from_numpy(np.ascontiguousarray(state[:, dim:]))
        out["step"] = torch.from_numpy(got["steps"].view(np.int64))
    else:
        out["sum"] = torch.from_numpy(state)
    return out


def _state_arrays(cache: Cache, saved: Dict[str, torch.Tensor]):
    """The keys, state (float32, keys x state length) and step counts (uint64 or None) that
    ``_save_state`` saved for the table of ``cache``, checked against the table's optimizer and
    rows; raises ValueError naming what does not fit."""
    table = cache.source_table
    optimizer = table.optimizer

    def array(name: str, dtype) -> np.ndarray:
        if name not in saved:
            raise ValueError(
                f"the optimizer state of table {table.name!r} ({optimizer.name}) has no {name!r}"
            )
        return saved[name].detach().to("cpu", dtype).contiguous().numpy()

    if table.dynamic is not None:
        keys = array("keys", torch.int64).view(np.uint64)
    else:
        keys = np.arange(table.rows, dtype=np.uint64)
    steps = None
    if optimizer.has_steps:
        moments = [array("exp_avg", torch.float32), array("exp_avg_sq", torch.float32)]
        if any(m.shape != (len(keys), table.dim) for m in moments):
            raise ValueError(
                f"the moments of table {table.name!r} are {[tuple(m.shape) for m in moments]}, "
                f"the table takes {(len(keys), table.dim)} each"
            )
        state = np.concatenate(moments, axis=1)
        steps = array("step", torch.int64).view(np.uint64)
    else:
        state = array("sum", torch.float32)
    want = (len(keys), optimizer.state_len(table.dim))
    if state.shape != want or (steps is not None and steps.shape != (len(keys),)):
        raise ValueError(
            f"the optimizer state of table {table.name!r} ({optimizer.name}) is {tuple(state.shape)}"
            + ("" if steps is None else f" with {len(steps)} steps")
            + f", the table takes {want}"
        )
    return keys, np.ascontiguousarray(state), steps


class _Stepped(nn.Module):
    """A module whose tables step at ``EmbeddingOptimizer.step()``: its carriers are the
    optimizer's parameters, ``_step`` hands their gradients to the caches."""

    update: str

    def _carriers(self):
        raise NotImplementedError

    def _caches(self) -> List[Cache]:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _zero_grad(self) -> None:
        raise NotImplementedError


class _CacheModule(_Stepped):
    def __init__(
        self,
        cache: Cache,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        device: Optional[torch.device] = None,
        update: str = "step",
    ):
        super().__init__()
        if not isinstance(cache, Cache):
            raise TypeError(f"expected a hetkv.Cache (Table.cached(...)), not {type(cache).__name__}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive, not {max_norm!r}")
        if update not in ("step", "backward"):
            raise ValueError(f'update must be "step" or "backward", not {update!r}')
        self.update = update
        # The gradients of update="step", accumulated by autograd until the step.
        self._grads = _StepGrads(cache.dim)
        self.grad_carrier = self._grads.carrier
        # Whether a prefetch waits for the next lookup, and the cache's unused prefetches before it.
        self._prefetching = False
        self._unused_seen = 0
        self._warned_unused = False
        self.cache = cache
        self.embedding_dim = cache.dim
        # A key as the input's keys are (its int64 value's bit pattern): not counted from the
        # end of the table when negative, as torch counts it, since a dynamic table's keys are
        # any u64 and a negative int64 is one of them.
        self.padding_idx = None if padding_idx is None else int(padding_idx)
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.device = None if device is None else torch.device(device)
        # The dtype rows come out in: a buffer of no element, which .half(), .bfloat16() and
        # .to(dtype) convert as they convert any floating buffer (not in the state dict).
        self.register_buffer("_out_dtype", torch.empty(0), persistent=False)

    def _out_device(self, input: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else input.device

    def _gathered(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """The rows of ``input``'s unique keys on the output device (the padding key's a row of
        zeros, never looked up), renormalized by ``max_norm`` and in the output dtype; each
        element's index among them; and the padding key's index (None when absent)."""
        device = self._out_device(input)
        keys, inverse, pad = self._keys(input)
        rows = self._rows(keys, device)
        self._check_prefetch()
        if pad is not None:
            rows = torch.cat([rows[:pad], rows.new_zeros(1, self.embedding_dim), rows[pad:]])
        if self.max_norm is not None:
            with torch.no_grad():
                norms = torch.linalg.vector_norm(rows, ord=self.norm_type, dim=1, keepdim=True)
                scale = (self.max_norm / (norms + 1e-7)).clamp(max=1.0)
            # torch renormalizes its weight in place and differentiates the lookup of the result:
            # the forward is the scaled row, the gradient reaches the row unscaled.
            rows = rows + (rows * scale - rows).detach()
        rows = rows.to(self._out_dtype.dtype)
        return rows, inverse.to(device), pad

    def _keys(self, input: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor, Optional[int]]:
        """The keys ``input`` looks up (its unique keys, sorted, as uint64, the padding key left
        out), each element's index among its unique keys, and the padding key's (None when
        absent): the one rule of forward and prefetch, so that a prefetch asks for what the
        forward of the same input looks up."""
        keys, inverse = _unique(input)
        pad = None
        if self.padding_idx is not None:
            padding = np.array([self.padding_idx], dtype=np.int64).view(np.uint64)[0]
            at = np.flatnonzero(keys == padding)
            if len(at):
                pad = int(at[0])
                keys = np.delete(keys, pad)
        return keys, inverse, pad

    def prefetch(self, input: torch.Tensor) -> None:
        """Starts the lookup of the next batch's ``input`` (as ``forward`` will be given it) and
        returns at once; the forward of the same input completes it, so the network round trip
        overlaps this batch's compute. Any updates made meanwhile (this batch's step) are in the
        rows it returns. A prefetch whose keys the next lookup does not ask for goes unused (the
        rows are read again): that warns once."""
        keys, _, _ = self._keys(input)
        # What the cache counted unused before this one (its own prefetches and others').
        self._unused_seen = self.cache.stats()["prefetches_unused"]
        self.cache.prefetch(keys)
        self._prefetching = True

    def _check_prefetch(self) -> None:
        """After the lookup that follows a prefetch: warns (once a module) when it went unused."""
        if not self._prefetching:
            return
        self._prefetching = False
        unused = self.cache.stats()["prefetches_unused"]
        if unused > self._unused_seen and not self._warned_unused:
            self._warned_unused = True
            warnings.warn(
                f"a prefetch of table {self.cache.table!r} went unused: the lookup after it asked "
                "for other keys (give prefetch() the next batch's input as forward() will get "
                "it). Its rows were read again; this warning is not repeated.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _rows(self, keys: np.ndarray, device: torch.device) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            # A leaf that requires grad, so that autograd calls _Rows.backward: the carrier, or
            # (fused) an empty one; the module itself has no parameter.
            if self.update == "step":
                carrier = self.grad_carrier
            else:
                carrier = torch.empty(0, requires_grad=True)
            return _Rows.apply(carrier, self, keys, device)
        return _lookup(self.cache, keys, device)

    def _carrier_grad(self, keys: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
        return self._grads.grad(keys, rows)

    def _carriers(self):
        return [self.grad_carrier]

    def _caches(self) -> List[Cache]:
        return [self.cache]

    def _step(self) -> None:
        """Hands the gradients accumulated since the last zero_grad to the cache: each key once,
        its gradients summed (one optimizer step on the shards, whatever the passes)."""
        pending = self._grads.pending()
        if pending is not None:
            self.cache.update(*pending)

    def _zero_grad(self) -> None:
        self._grads.clear()

    def flush(self) -> None:
        """Pushes every update the cache holds (before a checkpoint or evaluation elsewhere)."""
        self.cache.flush()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_table(self.cache, destination, prefix)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        _load_table(self.cache, state_dict, prefix, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        fused = ", update='backward'" if self.update == "backward" else ""
        return f"table={self.cache.table!r}, embedding_dim={self.embedding_dim}" + fused


class Embedding(_CacheModule):
    """``torch.nn.Embedding`` over a hetkv cache: ``forward(input)`` maps an integer tensor of
    any shape to its rows, shape ``input.shape + (dim,)``, on ``device`` (the input's when None).
    ``padding_idx``, ``max_norm`` and ``norm_type`` as the module's docstring says.

    Keys on the CPU with ``device="cuda"`` is the quick way to feed a GPU model (as TorchRec
    keeps its keys on the host): the keys never cross to the GPU and back."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, inverse, _ = self._gathered(input)
        return F.embedding(inverse, rows).reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + _options(self)


class EmbeddingBag(_CacheModule):
    """``torch.nn.EmbeddingBag`` over a hetkv cache, ``mode`` "sum", "mean" or "max".

    ``forward(input, offsets=None, per_sample_weights=None)`` takes bags as
    ``torch.nn.EmbeddingBag`` does: a 2-D input (one bag per row), or a 1-D input with
    ``offsets`` (where each bag starts; with ``include_last_offset``, the last offset ends the
    last bag); ``per_sample_weights`` with ``mode="sum"``. ``padding_idx``, ``max_norm`` and
    ``norm_type`` as the module's docstring says."""

    def __init__(
        self,
        cache: Cache,
        mode: str = "mean",
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        include_last_offset: bool = False,
        device: Optional[torch.device] = None,
        update: str = "step",
    ):
        super().__init__(cache, padding_idx, max_norm, norm_type, device, update)
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f'mode must be "sum", "mean" or "max", not {mode!r}')
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        rows, inverse, pad = self._gathered(input)
        device = rows.device
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.to(device, rows.dtype)
        return F.embedding_bag(
            inverse.reshape(input.shape),
            rows,
            None if offsets is None else offsets.to(device),
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
            padding_idx=pad,
        )

    def extra_repr(self) -> str:
        last = ", include_last_offset=True" if self.include_last_offset else ""
        return super().extra_repr() + f", mode={self.mode!r}" + _options(self) + last


def _options(m: _CacheModule) -> str:
    """The ``nn`` options a module was given, as ``extra_repr`` lists them."""
    out = ""
    if m.padding_idx is not None:
        out += f", padding_idx={m.padding_idx}"
    if m.max_norm is not None:
        out += f", max_norm={m.max_norm}, norm_type={m.norm_type}"
    if m._out_dtype.dtype != torch.float32:
        out += f", dtype={m._out_dtype.dtype}"
    return out


class EmbeddingOptimizer(torch.optim.Optimizer):
    """The step of hetkv embedding modules (those built with ``update="step"``, the default):
    ``step()`` hands each module's gradients, summed per key since the last ``zero_grad()``, to
    its cache, so the table's own optimizer takes one step on the shards (its learning rate and
    state are the table's, not this object's). Give it a model (every such module in it) or the
    modules; its parameters are the modules' gradient carriers, so ``torch.amp.GradScaler``
    unscales them and skips the step when one is not finite, and
    ``torch.nn.utils.clip_grad_norm_`` can take them (``optimizer.param_groups[0]["params"]``).
    ``zero_grad()`` clears them: ``model.zero_grad()`` does not reach them (they are not the
    model's parameters).

    ``state_dict()`` carries the tables' optimizer state as the shards hold it, as a torch
    optimizer's carries its own: under ``"tables"``, each table's by name, with torch's names
    (Adagrad's and row-wise Adagrad's ``sum``; Adam's ``exp_avg``, ``exp_avg_sq`` and ``step``,
    Adam's step counted per row), one row a key (a dynamic table's with its ``keys``); SGD tables
    have none. ``load_state_dict`` sets it on the shards, the rows' values kept, and makes the
    caches read the rows again; with the model's ``load_state_dict`` (which sets the values and
    keeps the state), in either order, the shards hold the saved rows and state, and a resumed
    run at bounds 0 trains on bit for bit as the saved one would have. A table missing from the
    state dict, or whose state does not fit its optimizer and rows, is refused before any table
    changes."""

    def __init__(self, modules):
        if isinstance(modules, nn.Module):
            modules = [m for m in modules.modules() if isinstance(m, _Stepped)]
        modules = list(modules)
        for m in modules:
            if not isinstance(m, _Stepped):
                raise TypeError(f"expected hetkv.torch modules, not {type(m).__name__}")
        fused = [m for m in modules if m.update != "step"]
        if fused:
            raise ValueError(
                f'{len(fused)} module(s) update in backward (update="backward"): nothing to step'
            )
        if not modules:
            raise ValueError("no hetkv.torch module to step")
        super().__init__([c for m in modules for c in m._carriers()], {})
        self._embedding_modules = modules

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for m in self._embedding_modules:
            m._step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self._embedding_modules:
            m._zero_grad()

    def _tables(self) -> List[Cache]:
        return [c for m in self._embedding_modules for c in m._caches()]

    def state_dict(self):  # type: ignore[override]
        out = super().state_dict()
        tables = {}
        for cache in self._tables():
            state = _save_state(cache)
            if state is not None:
                tables[cache.table] = state
        out["tables"] = tables
        return out

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        tables = state_dict.pop("tables", None)
        if tables is None:
            raise ValueError("this state dict has no \"tables\": it is not an EmbeddingOptimizer's")
        # Every table's state checked before any is set.
        loads = []
        for cache in self._tables():
            table = cache.source_table
            if table.optimizer.state_len(table.dim) == 0:
                continue
            if cache.table not in tables:
                raise ValueError(f"the state dict holds no optimizer state of table {cache.table!r}")
            loads.append((cache, _state_arrays(cache, tables[cache.table])))
        super().load_state_dict(state_dict)
        for cache, (keys, state, steps) in loads:
            cache.flush()
            if len(keys):
                cache.source_table.assign(keys, state=state, steps=steps)
            cache.invalidate()


@dataclass
class EmbeddingBagConfig:
    """One table of an :class:`EmbeddingBagCollection`: its cache (``Table.cached(...)``; the
    dim, optimizer and learning rate are the table's own), the features that look it up (several
    features may share a table), and how each bag pools: ``"sum"``, ``"mean"`` or ``"max"``."""

    cache: Cache
    feature_names: Sequence[str]
    pooling: str = "sum"


@dataclass
class EmbeddingConfig:
    """One table of an :class:`EmbeddingCollection`: its cache and the features that look it up."""

    cache: Cache
    feature_names: Sequence[str]


class _Plan:
    """What one table looks up for a batch: its features' ids (unique, sorted, uint64) and, for
    each feature, its name, its jagged ids and each id's index among the table's keys."""

    def __init__(self, keys: np.ndarray, features: List[Tuple[str, JaggedTensor, torch.Tensor]]):
        self.keys = keys
        self.features = features


class _CollectionRows(torch.autograd.Function):
    """The rows of every table of a collection, read together (one request a shard): forward
    looks them up; backward hands the gradient rows of the tables whose rows were used to the
    caches together (``update="backward"``), or returns them as the sparse gradients of the
    tables' carriers (``update="step"``)."""

    @staticmethod
    def forward(ctx, module, keys, device, *carriers):  # type: ignore[override]
        ctx.module = module
        ctx.keys = keys
        ctx.carriers = len(carriers)
        ctx.set_materialize_grads(False)  # a table whose rows went unused gets no update
        return tuple(module._lookup(keys, device))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        m = ctx.module
        # Every table's gradient rows cross to the host in one copy.
        present = [i for i, g in enumerate(grads) if g is not None]
        rows: List[Optional[torch.Tensor]] = [None] * len(grads)
        if present:
            flat = torch.cat([grads[i].detach().reshape(-1).float() for i in present]).cpu()
            sizes = [grads[i].numel() for i in present]
            for i, part in zip(present, torch.split(flat, sizes)):
                rows[i] = part.view(grads[i].shape)
        none = (None, None, None)
        if m.update == "backward":
            used = [i for i, r in enumerate(rows) if r is not None and len(ctx.keys[i])]
            if used:
                update_many(
                    [m._configs[i].cache for i in used],
                    [ctx.keys[i] for i in used],
                    [rows[i].numpy() for i in used],
                )
            return none + (None,) * ctx.carriers
        return none + tuple(
            None if r is None else m._grads[i].grad(ctx.keys[i], r) for i, r in enumerate(rows)
        )


class _Collection(_Stepped):
    """Many tables, each with its own dim, optimizer and learning rate, looked up together from
    jagged input: one request a shard a batch for all of them, and one a step for their updates
    (``hetkv.lookup_many`` and ``hetkv.update_many``). The caches must be of one cluster
    connection."""

    def __init__(self, tables, device: Optional[torch.device], update: str):
        super().__init__()
        tables = list(tables)
        if not tables:
            raise ValueError("a collection needs at least one table")
        if update not in ("step", "backward"):
            raise ValueError(f'update must be "step" or "backward", not {update!r}')
        seen = set()
        for t in tables:
            if not isinstance(t.cache, Cache):
                raise TypeError(
                    f"expected a hetkv.Cache (Table.cached(...)), not {type(t.cache).__name__}"
                )
            if not t.feature_names:
                raise ValueError(f"table {t.cache.table!r} has no feature")
            for f in t.feature_names:
                if f in seen:
                    raise ValueError(f"feature {f!r} is named by two tables")
                seen.add(f)
        if len({id(t.cache) for t in tables}) != len(tables):
            raise ValueError("a cache is given to two tables: name both features in one config")
        self._configs = tables
        self.update = update
        self.device = None if device is None else torch.device(device)
        self._grads = [_StepGrads(t.cache.dim) for t in tables]
        self._prefetching = False
        self._unused_seen = 0
        self._warned_unused = False
        # The features of the last prefetch and their plans (forward of the same object reuses
        # them: the unique keys are computed once a batch).
        self._planned: Optional[Tuple[object, List[_Plan]]] = None

    def _plan(self, features) -> List[_Plan]:
        """Each table's keys of ``features`` (the one rule of forward and prefetch); worked out
        once for the features a prefetch was given, which forward then reuses."""
        if self._planned is not None and self._planned[0] is features:
            return self._planned[1]
        # Every id crosses to the host once (one copy, one wait), where each table's keys are made
        # unique; every table's indices cross back in one copy.
        values = features.values()
        on_host = values.to("cpu") if values.device.type != "cpu" else values
        names = self.feature_names()
        spans = _spans(features, names)
        every = _features(features, names, spans)
        tables, inverses = [], []
        for t in self._configs:
            jagged = [(f, every[f]) for f in t.feature_names]
            ids = torch.cat([on_host[spans[f][1] : spans[f][2]] for f in t.feature_names])
            keys, inverse = _unique(ids)
            tables.append((keys, jagged))
            inverses.append(inverse)
        sizes = [len(i) for i in inverses]
        inverses = torch.split(torch.cat(inverses).to(values.device, non_blocking=True), sizes)
        plans = []
        for (keys, jagged), inverse in zip(tables, inverses):
            parts = torch.split(inverse, [len(j.values()) for _, j in jagged])
            plans.append(_Plan(keys, [(f, j, p) for (f, j), p in zip(jagged, parts)]))
        return plans

    def _unused(self) -> int:
        return sum(t.cache.stats()["prefetches_unused"] for t in self._configs)

    def _lookup(self, keys: List[np.ndarray], device: torch.device) -> List[torch.Tensor]:
        caches = [t.cache for t in self._configs]
        if device.type == "cuda":
            # Written straight into one block of pinned host memory and copied in one go without
            # blocking the host (PyTorch's caching host allocator keeps the block until the copy
            # is done); each table's rows are a view of it on the device.
            sizes = [len(k) * c.dim for k, c in zip(keys, caches)]
            staged = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=True)
            parts = torch.split(staged, sizes)
            lookup_many(caches, keys, [p.view(len(k), c.dim).numpy() for p, k, c in zip(parts, keys, caches)])
            on_device = torch.split(staged.to(device, non_blocking=True), sizes)
            rows = [r.view(len(k), c.dim) for r, k, c in zip(on_device, keys, caches)]
        else:
            rows = [torch.from_numpy(r).to(device) for r in lookup_many(caches, keys)]
        if self._prefetching:
            self._prefetching = False
            if self._unused() > self._unused_seen and not self._warned_unused:
                self._warned_unused = True
                warnings.warn(
                    "a prefetch of the collection went unused: the lookup after it asked for "
                    "other keys (give prefetch() the next batch's features as forward() will get "
                    "them). Its rows were read again; this warning is not repeated.",
                    RuntimeWarning,
                    stacklevel=5,
                )
        return rows

    def _rows(self, plans: List[_Plan], device: torch.device) -> List[torch.Tensor]:
        keys = [p.keys for p in plans]
        if torch.is_grad_enabled() and self.training:
            if self.update == "step":
                carriers = [g.carrier for g in self._grads]
            else:
                carriers = [torch.empty(0, requires_grad=True)]
            return list(_CollectionRows.apply(self, keys, device, *carriers))
        return self._lookup(keys, device)

    def _out_device(self, features) -> torch.device:
        return self.device if self.device is not None else features.values().device

    def prefetch(self, features) -> None:
        """Starts the lookup of the next batch's ``features`` (as ``forward`` will be given
        them) in every table, one request a shard for all, and returns at once; the forward of
        the same features completes it. A prefetch the next forward does not use warns once."""
        self._planned = None
        plans = self._plan(features)
        self._planned = (features, plans)
        self._unused_seen = self._unused()
        prefetch_many([t.cache for t in self._configs], [p.keys for p in plans])
        self._prefetching = True

    def _carriers(self):
        return [g.carrier for g in self._grads]

    def _caches(self) -> List[Cache]:
        return [t.cache for t in self._configs]

    def _step(self) -> None:
        """Hands every table's gradients since the last zero_grad to its cache, all tables in
        one call (one request a shard): each key once, its gradients summed."""
        pending = [(t.cache, p) for t, g in zip(self._configs, self._grads) if (p := g.pending())]
        if pending:
            update_many([c for c, _ in pending], [p[0] for _, p in pending], [p[1] for _, p in pending])

    def _zero_grad(self) -> None:
        for g in self._grads:
            g.clear()

    def flush(self) -> None:
        """Pushes every update the tables' caches hold."""
        for t in self._configs:
            t.cache.flush()

    # Where each table's rows go in a state dict, as in TorchRec's modules.
    _state_prefix = "embedding_bags"

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for t in self._configs:
            _save_table(t.cache, destination, f"{prefix}{self._state_prefix}.{t.cache.table}.")

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for t in self._configs:
            at = f"{prefix}{self._state_prefix}.{t.cache.table}."
            _load_table(t.cache, state_dict, at, missing_keys, unexpected_keys, error_msgs)

    def feature_names(self) -> List[str]:
        return [f for t in self._configs for f in t.feature_names]

    def extra_repr(self) -> str:
        tables = ", ".join(f"{t.cache.table}({t.cache.dim}): {list(t.feature_names)}" for t in self._configs)
        return tables + (", update='backward'" if self.update == "backward" else "")


class EmbeddingBagCollection(_Collection):
    """TorchRec's ``EmbeddingBagCollection`` over hetkv caches: ``forward(features)`` takes a
    :class:`KeyedJaggedTensor` (hetkv's, or TorchRec's) and returns a :class:`KeyedTensor` of
    each feature's pooled bags (``stride x dim`` each, in the tables' order, then their features'),
    on ``device`` (the ids' when None). With ``is_weighted`` (every table pooling ``"sum"``), the
    input's per-id ``weights`` weight each id's row, as TorchRec's weighted collection does;
    without it they are ignored. An empty bag pools to zeros. Every table is read in one request a shard, and (with
    :class:`EmbeddingOptimizer`) updated in one.

    >>> ebc = hetkv.torch.EmbeddingBagCollection([
    ...     hetkv.torch.EmbeddingBagConfig(ads.cached(0.1), ["ad_id"], pooling="sum"),
    ...     hetkv.torch.EmbeddingBagConfig(users.cached(0.1), ["user_id", "friend_id"], "mean"),
    ... ])
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        device: Optional[torch.device] = None,
        update: str = "step",
        is_weighted: bool = False,
    ):
        super().__init__(tables, device, update)
        for t in self._configs:
            if t.pooling not in ("sum", "mean", "max"):
                raise ValueError(f'pooling must be "sum", "mean" or "max", not {t.pooling!r}')
            if is_weighted and t.pooling != "sum":
                raise ValueError(
                    f"table {t.cache.table!r} pools by {t.pooling!r}: weights weight sum pooling"
                )
        self.is_weighted = is_weighted

    def forward(self, features) -> KeyedTensor:
        device = self._out_device(features)
        plans = self._plan(features)
        self._planned = None
        rows = self._rows(plans, device)
        pooled, names, dims = [], [], []
        for t, p, r in zip(self._configs, plans, rows):
            for name, jagged, inverse in p.features:
                weights = jagged.weights_or_none() if self.is_weighted else None
                if self.is_weighted and weights is None:
                    raise ValueError(f"feature {name!r} has no weights (the collection is weighted)")
                pooled.append(
                    F.embedding_bag(
                        inverse.to(device),
                        r,
                        jagged.offsets()[:-1].to(device),
                        mode=t.pooling,
                        per_sample_weights=None if weights is None else weights.to(device, r.dtype),
                    )
                )
                names.append(name)
                dims.append(t.cache.dim)
        return KeyedTensor(names, dims, torch.cat(pooled, dim=1))


class EmbeddingCollection(_Collection):
    """TorchRec's ``EmbeddingCollection`` over hetkv caches (no pooling): ``forward(features)``
    returns, for each feature, a :class:`JaggedTensor` of its ids' rows (``ids x dim``) with the
    input's lengths. Every table is read in one request a shard."""

    _state_prefix = "embeddings"

    def __init__(
        self,
        tables: Sequence[EmbeddingConfig],
        device: Optional[torch.device] = None,
        update: str = "step",
    ):
        super().__init__(tables, device, update)

    def forward(self, features) -> Dict[str, JaggedTensor]:
        device = self._out_device(features)
        plans = self._plan(features)
        self._planned = None
        rows = self._rows(plans, device)
        out = {}
        for p, r in zip(plans, rows):
            for name, jagged, inverse in p.features:
                out[name] = JaggedTensor(F.embedding(inverse.to(device), r), jagged.lengths())
        return out


def _batch_to(batch, device: torch.device, non_blocking: bool):
    """``batch`` on ``device``: a tensor, a KeyedJaggedTensor (anything with ``to``), or a
    tuple, list, dict or dataclass of them."""
    if isinstance(batch, (torch.Tensor, KeyedJaggedTensor)) or hasattr(batch, "to"):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_batch_to(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: _batch_to(v, device, non_blocking) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch,
            **{f.name: _batch_to(getattr(batch, f.name), device, non_blocking)
               for f in dataclasses.fields(batch)},
        )
    return batch


def _sparse_features(batch):
    """The sparse features of a batch as TorchRec's ``Batch`` holds them."""
    if isinstance(batch, dict):
        return batch["sparse_features"]
    return batch.sparse_features


class TrainPipeline:
    """A training loop over a DataLoader's iterator, in the manner of TorchRec's
    ``TrainPipelineSparseDist``: ``progress(iterator)`` trains one batch and returns the model's
    output, while the next batch's embedding lookups travel.

    Each call runs ``model(batch)``, which returns ``(loss, output)`` as TorchRec's models do;
    then, before the backward, it starts the lookups of the next batch (``prefetch`` of every
    hetkv module the model feeds, with the keys worked out once: the forward of that batch reuses
    them) and its copy to ``device`` (on a side stream on a GPU); then ``backward``, the dense
    ``optimizer``'s step and the embeddings' (an :class:`EmbeddingOptimizer` over the model's
    hetkv modules, made here unless the model's modules all update in backward), and both
    ``zero_grad``. Rows arrive through pinned memory and are copied without blocking. At the end
    of the iterator it raises ``StopIteration``.

    ``inputs(batch)`` says what each hetkv module of the model is given: a list of ``(module,
    input)`` pairs. By default every collection gets ``batch.sparse_features`` (or
    ``batch["sparse_features"]``), TorchRec's ``Batch`` layout. ``scaler``, a
    ``torch.amp.GradScaler``, scales the loss and steps both optimizers through it.

    What holds of the rows is what holds of a prefetch (``Cache.prefetch``): at bounds 0 they are
    the rows an unpipelined loop reads, bit for bit."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        device: Optional[torch.device] = None,
        inputs=None,
        scaler: Optional["torch.amp.GradScaler"] = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.scaler = scaler
        stepped = [m for m in model.modules() if isinstance(m, _Stepped) and m.update == "step"]
        self.embedding_optimizer = EmbeddingOptimizer(stepped) if stepped else None
        self._inputs = inputs
        if inputs is None and not any(isinstance(m, _Collection) for m in model.modules()):
            raise ValueError(
                "the model has no hetkv collection to feed batch.sparse_features to: say what "
                "each hetkv module is given with inputs=lambda batch: [(module, input), ...]"
            )
        self._stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self._next = None
        self._connected = False

    def _feeds(self, batch):
        if self._inputs is not None:
            return list(self._inputs(batch))
        features = _sparse_features(batch)
        return [(m, features) for m in self.model.modules() if isinstance(m, _Collection)]

    def _fetch(self, iterator):
        """The next batch on the device, its copy started; None at the end."""
        try:
            batch = next(iterator)
        except StopIteration:
            return None
        if self._stream is None:
            return _batch_to(batch, self.device, non_blocking=False)
        with torch.cuda.stream(self._stream):
            return _batch_to(batch, self.device, non_blocking=True)

    def _prefetch(self, batch) -> None:
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        if self.model.training:
            for module, features in self._feeds(batch):
                module.prefetch(features)

    def progress(self, iterator):
        """Trains the next batch of ``iterator`` and returns the model's output."""
        if not self._connected:
            self._connected = True
            self._next = self._fetch(iterator)
            if self._next is not None:
                self._prefetch(self._next)
        batch = self._next
        if batch is None:
            raise StopIteration
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        loss, output = self.model(batch)
        self._next = self._fetch(iterator)
        if self._next is not None:
            self._prefetch(self._next)
        if self.model.training:
            optimizers = [o for o in (self.optimizer, self.embedding_optimizer) if o is not None]
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                for o in optimizers:
                    self.scaler.step(o)
                self.scaler.update()
            else:
                loss.backward()
                for o in optimizers:
                    o.step()
            for o in optimizers:
                o.zero_grad()
        return output
