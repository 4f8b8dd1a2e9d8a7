"""hetkv: an RDMA-backed key-value store for embedding tables (HET, PVLDB 2022), for Python.

Store daemons (``hetkv serve``) hold embedding tables; this package is the client, in the words
of the Rust client crate:

>>> import numpy as np, hetkv
>>> with hetkv.EmbeddedCluster(shards=2) as cluster:          # or hetkv.connect([...])
...     table = cluster.create_table("ads", rows=1000, dim=8,
...                                  optimizer=hetkv.Optimizer.sgd(lr=0.1))
...     cache = table.cached(capacity=0.1, policy="lfu", pull_bound=100, push_bound=100)
...     keys = np.array([1, 5, 5, 42], dtype=np.uint64)
...     rows = cache.lookup(keys)                              # float32, keys x dim
...     cache.update(keys, np.ones_like(rows))                 # one gradient row per key
...     cache.flush()
...     print(table.pull(keys)[1, 0])
-0.2

Keys are ``numpy.uint64`` and rows ``numpy.float32``, C-contiguous: they cross into Rust without
a copy (anything else is a ``TypeError`` or ``ValueError`` that says how to convert it). Every
call that talks to a shard releases the GIL. Errors are subclasses of :class:`hetkv.Error`.

:mod:`hetkv.torch` has ``Embedding`` and ``EmbeddingBag`` modules over a cache, collections of
many tables over jagged input (``EmbeddingBagCollection``, ``EmbeddingCollection``: every table
in one request a shard) and ``TrainPipeline``; the tables' optimizers run on the shards.
``lookup_many``, ``prefetch_many`` and ``update_many`` drive several caches as one below torch.
:mod:`hetkv.ray` runs the shards as Ray actors. ``hetkv serve`` (this package's command, or
``python -m hetkv``) runs a shard.
"""

from ._hetkv import (
    Cache,
    CheckpointError,
    Cluster,
    ConnectionError,
    Dynamic,
    EmbeddedCluster,
    Error,
    Initializer,
    InvalidGradientError,
    KeyOutOfRangeError,
    Optimizer,
    PartlyAppliedError,
    ProtocolError,
    PushesUnknownError,
    RemoteError,
    RollbackError,
    Table,
    TableConflictError,
    UnknownTableError,
    WrongDimError,
    __version__,
    connect,
    lookup_many,
    prefetch_many,
    update_many,
)

__all__ = [
    "Cache",
    "CheckpointError",
    "Cluster",
    "ConnectionError",
    "Dynamic",
    "EmbeddedCluster",
    "Error",
    "Initializer",
    "InvalidGradientError",
    "KeyOutOfRangeError",
    "Optimizer",
    "PartlyAppliedError",
    "ProtocolError",
    "PushesUnknownError",
    "RemoteError",
    "RollbackError",
    "Table",
    "TableConflictError",
    "UnknownTableError",
    "WrongDimError",
    "__version__",
    "connect",
    "lookup_many",
    "prefetch_many",
    "update_many",
]
