"""hetkv's shards as Ray actors: a cluster started, watched and restarted by Ray.

``start_shards(shards=4, data_root=...)`` starts one actor a shard (spread over the Ray cluster's
nodes where there are several), each running ``hetkv serve`` in its own process (the wheel's
daemon, not a subprocess: the daemon lives and dies with the actor) on a port fixed at start,
with a data directory of its own under ``data_root``. When a shard's actor dies (its node lost,
the process killed), Ray starts it again (``max_restarts``) with the same arguments: the daemon
restores the newest checkpoint of its data directory and listens on the same address, so
trainers' connections go on (their calls wait for it within their deadline, and a restart that
took back acknowledged pushes is reported to them: ``Cluster.restarts``, ``RollbackError``).
Checkpoint with ``Cluster.checkpoint`` to bound what a restart takes back.

``data_root`` must be storage the node that restarts a shard can read: a filesystem every node
mounts, or one node. Each shard's port is picked once, free on the driver's host when picked
(on a cluster of several nodes it is assumed free on the shard's node too; a shard that cannot
bind it fails to start, with the daemon's error).

>>> import hetkv.ray
>>> shards = hetkv.ray.start_shards(shards=2, data_root="/mnt/shared/hetkv")
>>> cluster = shards.connect()              # or hetkv.connect(shards.addrs) in a Ray Train worker
>>> shards.shutdown()

Ray is imported here, at run time: the hetkv wheel does not depend on it.
"""

import os
import socket
import time
from typing import List, Optional, Sequence

import ray

from . import connect
from ._hetkv import Cluster

__all__ = ["RayShards", "start_shards"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class _Shard:
    """One shard: ``hetkv serve`` on a thread of this actor's process."""

    def __init__(self, argv: List[str], port: int, startup_timeout: float):
        import threading

        from ._hetkv import _run_cli

        self.host = ray.util.get_node_ip_address()
        self.port = port
        self.failed: Optional[int] = None

        def serve() -> None:
            self.failed = _run_cli(argv)

        threading.Thread(target=serve, name="hetkv-serve", daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.failed is not None:
                raise RuntimeError(f"hetkv serve {' '.join(argv[2:])} exited with status {self.failed}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hetkv serve did not listen on port {port} within {startup_timeout} s")
                time.sleep(0.05)

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def pid(self) -> int:
        return os.getpid()


class RayShards:
    """The shards' actors and their addresses (in shard order)."""

    def __init__(self, actors: Sequence["ray.actor.ActorHandle"], addrs: Sequence[str]):
        self.actors = list(actors)
        self.addrs = list(addrs)

    def connect(self, **kwargs) -> Cluster:
        """``hetkv.connect`` to these shards (its keyword arguments: ``auth_token``, ``timeout``,
        ...)."""
        return connect(self.addrs, **kwargs)

    def kill(self, shard: int) -> None:
        """Kills shard ``shard``'s actor as a crash would; Ray restarts it (within
        ``max_restarts``), and it restores its newest checkpoint."""
        ray.kill(self.actors[shard], no_restart=False)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every shard's actor answers (after a restart, once it listens again)."""
        ray.get([a.address.remote() for a in self.actors], timeout=timeout)

    def shutdown(self) -> None:
        """Kills every shard's actor for good (what was not checkpointed is lost)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)


def start_shards(
    shards: int,
    data_root: str,
    max_restarts: int = 3,
    auth_token_file: Optional[str] = None,
    args: Sequence[str] = (),
    num_cpus: float = 1,
    startup_timeout: float = 120.0,
) -> RayShards:
    """Starts ``shards`` shard actors (spread over the nodes), shard ``i`` with data directory
    ``data_root/shard-i``, listening on all addresses at a port chosen now and kept across
    restarts; ``args`` are more ``hetkv serve`` flags (``--max-memory``, ``--checkpoint-on-exit``,
    ...). Returns once every shard listens. A daemon that listens beyond loopback wants
    ``auth_token_file`` (a path every node can read), which its trainers present."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    actors, addrs = [], []
    for i in range(shards):
        port = _free_port()
        argv = [
            "hetkv", "serve",
            f"--shard={i}", f"--shards={shards}",
            f"--listen=0.0.0.0:{port}",
            f"--data-dir={os.path.join(data_root, f'shard-{i}')}",
            *([f"--auth-token-file={auth_token_file}"] if auth_token_file else []),
            *args,
        ]
        actor = _Shard.options(
            max_restarts=max_restarts,
            max_task_retries=-1,
            num_cpus=num_cpus,
            scheduling_strategy="SPREAD",
        ).remote(argv, port, startup_timeout)
        actors.append(actor)
    addrs = ray.get([a.address.remote() for a in actors], timeout=startup_timeout)
    return RayShards(actors, addrs)
