"""Type stubs of hetkv's native module."""

from os import PathLike
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

class Error(Exception):
    """The base of every hetkv error; its message is the Rust client's."""

class ConnectionError(Error):
    """A shard could not be reached, or broke the connection, within the call's deadline."""

class UnknownTableError(Error):
    """No shard holds a table of that name."""

class KeyOutOfRangeError(Error):
    """A key outside the table's [0, rows)."""

class WrongDimError(Error):
    """Rows or gradients whose shape does not match the keys and the table's dim."""

class InvalidGradientError(Error):
    """A gradient holding NaN or infinity: nothing was applied."""

class CheckpointError(Error):
    """A checkpoint could not be written (nothing committed was lost)."""

class TableConflictError(Error):
    """A table of that name exists with another spec, or the spec is invalid."""

class ProtocolError(Error):
    """A shard broke the protocol, or the shards disagree about the cluster."""

class RemoteError(Error):
    """A shard refused the request for another reason."""

class RollbackError(Error):
    """A shard restarted from a checkpoint that lacks pushes it had acknowledged: those updates are
    lost. Raised once per rollback, by the call that learnt of it; the next call goes on."""

class PartlyAppliedError(Error):
    """A write spanning shards that some applied and others did not: the message says which."""

class PushesUnknownError(Error):
    """Pushes whose fate no one can tell: the shard may or may not have applied them. They were
    never sent again (so none was applied twice). Raised by the `flush` that follows."""

class Initializer:
    """How a table's rows start: a pure function of the seed and the row."""
    @staticmethod
    def zeros() -> "Initializer": ...
    @staticmethod
    def uniform(bound: float, seed: int = 0) -> "Initializer": ...
    @staticmethod
    def normal(std: float, seed: int = 0) -> "Initializer": ...

class Optimizer:
    """The optimizer a table's shards apply to pushed gradients. A parameter left out takes the
    one default the Rust crate and the TOML config use; one out of range is a ValueError naming
    it."""
    @staticmethod
    def sgd(lr: float) -> "Optimizer": ...
    @staticmethod
    def adagrad(
        lr: float, eps: Optional[float] = None, initial_accumulator: Optional[float] = None
    ) -> "Optimizer": ...
    @staticmethod
    def rowwise_adagrad(
        lr: float, eps: Optional[float] = None, initial_accumulator: Optional[float] = None
    ) -> "Optimizer": ...
    @staticmethod
    def adam(
        lr: float,
        beta1: Optional[float] = None,
        beta2: Optional[float] = None,
        eps: Optional[float] = None,
    ) -> "Optimizer": ...
    @property
    def lr(self) -> float: ...
    @property
    def name(self) -> str: ...
    def state_len(self, dim: int) -> int: ...
    @property
    def has_steps(self) -> bool: ...

class Dynamic:
    """What makes a table dynamic: any u64 key (raw feature ids; int64 keys are taken as their
    u64 bit pattern), rows created when a key is admitted (on its first update; after
    ``admit_after`` updates counted while not held; or with probability ``admit_probability`` per
    update, seeded), at most the table's ``rows`` over the cluster, evicting a full bucket's least
    recently (``"lru"``) or least frequently (``"lfu"``) updated row; ``eviction="ttl"`` with
    ``ttl=N`` expires rows not updated in the N training steps before the one
    ``Table.advance_step`` announces."""
    def __init__(
        self,
        eviction: str = "lru",
        admit_after: Optional[int] = None,
        admit_probability: Optional[float] = None,
        seed: int = 0,
        ttl: Optional[int] = None,
    ) -> None: ...

Keys = Union[npt.NDArray[np.uint64], npt.NDArray[np.int64]]

class Cache:
    """One worker's HET cache of a table."""
    def lookup(
        self, keys: npt.NDArray[np.uint64], out: Optional[npt.NDArray[np.float32]] = None
    ) -> npt.NDArray[np.float32]: ...
    def update(self, keys: npt.NDArray[np.uint64], grads: npt.NDArray[np.float32]) -> None: ...
    def prefetch(self, keys: npt.NDArray[np.uint64]) -> None: ...
    def set_bounds(self, pull_bound: Optional[int], push_bound: Optional[int]) -> None: ...
    @property
    def bounds(self) -> Tuple[Optional[int], Optional[int]]: ...
    def flush(self) -> None: ...
    def invalidate(self) -> None: ...
    @property
    def source_table(self) -> "Table": ...
    def stats(self) -> Dict[str, Union[int, float]]: ...
    @property
    def dim(self) -> int: ...
    @property
    def table(self) -> str: ...

class Table:
    """One table of a cluster: direct reads and writes (no cache)."""
    @property
    def name(self) -> str: ...
    @property
    def rows(self) -> int: ...
    @property
    def dynamic(self) -> Optional[Dynamic]: ...
    @property
    def dim(self) -> int: ...
    @property
    def optimizer(self) -> Optimizer: ...
    def pull(
        self,
        keys: Keys,
        out: Optional[npt.NDArray[np.float32]] = None,
        versions: Optional[npt.NDArray[np.uint64]] = None,
    ) -> npt.NDArray[np.float32]: ...
    def push(
        self,
        keys: Keys,
        grads: npt.NDArray[np.float32],
        counts: Optional[npt.NDArray[np.uint32]] = None,
    ) -> int: ...
    def push_report(
        self,
        keys: Keys,
        grads: npt.NDArray[np.float32],
        counts: Optional[npt.NDArray[np.uint32]] = None,
    ) -> Dict[str, Any]: ...
    def assign(
        self,
        keys: Keys,
        values: Optional[npt.NDArray[np.float32]] = None,
        *,
        state: Optional[npt.NDArray[np.float32]] = None,
        steps: Optional[npt.NDArray[np.uint64]] = None,
        keep_state: bool = False,
    ) -> int: ...
    def advance_step(self, step: int) -> int: ...
    def evictions(self, shard: int, cursor: int = 0, max: int = 65536) -> Dict[str, Any]: ...
    def read_rows(
        self, keys: Optional[npt.NDArray[np.uint64]] = None, state: bool = False
    ) -> Dict[str, Any]: ...
    def export(
        self, path: Union[str, PathLike], keys: Optional[npt.NDArray[np.uint64]] = None
    ) -> int: ...
    def import_file(self, path: Union[str, PathLike], tensor: str = "embeddings") -> int: ...
    def cached(
        self,
        capacity: Union[float, int] = 0.1,
        policy: str = "lfu",
        pull_bound: Optional[int] = 100,
        push_bound: Optional[int] = 100,
        update_rule: str = "push-whole",
    ) -> Cache: ...

class Cluster:
    """A connection to every shard of a cluster."""
    @property
    def addrs(self) -> List[str]: ...
    def create_table(
        self,
        name: str,
        rows: int,
        dim: int,
        init: Optional[Initializer] = None,
        optimizer: Optional[Optimizer] = None,
        buckets: Optional[int] = None,
        dynamic: Optional[Dynamic] = None,
        fresh: bool = False,
    ) -> Table: ...
    def table(self, name: str) -> Table: ...
    def drop_table(self, name: str) -> None: ...
    def checkpoint(self, name: str, incremental: bool = False) -> List[Dict[str, Any]]: ...
    def stats(self) -> List[Dict[str, int]]: ...
    def restarts(self) -> Dict[str, int]: ...
    def set_on_rollback(self, on: str) -> None: ...

class EmbeddedCluster(Cluster):
    """Shards running in this process, on loopback TCP. Refused under several ranks
    (``WORLD_SIZE`` above 1, as torchrun sets it): each rank would train a table of its own."""
    def __init__(
        self,
        shards: int = 2,
        tables: Optional[Sequence[Dict[str, Any]]] = None,
        data_dir: Optional[Union[str, PathLike]] = None,
    ) -> None: ...
    def close(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def __enter__(self) -> "EmbeddedCluster": ...
    def __exit__(self, *exc: Any) -> bool: ...

def connect(
    addrs: Union[Sequence[str], str],
    transport: str = "auto",
    auth_token: Optional[str] = None,
    timeout: float = 60.0,
    emulated_link_gbps: Optional[float] = None,
    wait_for_daemon: float = 0.0,
    shards: Optional[int] = None,
) -> Cluster: ...

def lookup_many(
    caches: Sequence[Cache],
    keys: Sequence[npt.NDArray[np.uint64]],
    outs: Optional[Sequence[npt.NDArray[np.float32]]] = None,
) -> List[npt.NDArray[np.float32]]:
    """Reads ``keys[i]`` from ``caches[i]`` for every ``i`` (as each cache's ``lookup``), one
    request a shard for all of them, into ``outs`` (or new arrays); the caches must be of one
    cluster connection."""

def prefetch_many(caches: Sequence[Cache], keys: Sequence[npt.NDArray[np.uint64]]) -> None:
    """Starts the lookup of ``keys[i]`` in ``caches[i]`` for every ``i`` (as each cache's
    ``prefetch``), one request a shard for all of them; their lookups complete it."""

def update_many(
    caches: Sequence[Cache],
    keys: Sequence[npt.NDArray[np.uint64]],
    grads: Sequence[npt.NDArray[np.float32]],
) -> None:
    """Applies ``grads[i]`` to ``caches[i]`` for every ``i`` (as each cache's ``update``), one
    request a shard for what is due to push; nothing changes when any input is invalid."""
