"""Ray Train over hetkv shards that Ray runs: the recipe for a Ray cluster.

The shards are Ray actors (``hetkv.ray.start_shards``: one a node where there are several, each
with its data directory, restarted by Ray when it dies, restoring its newest checkpoint); the
trainers are Ray Train's ``TorchTrainer`` workers (DDP for the dense part through
``ray.train.torch.prepare_model``, each worker's cache for the embeddings), connected to the
shards' addresses. Rank 0 checkpoints the cluster every ``--checkpoint-every`` steps, so a shard
that dies comes back with at most that many steps of its rows lost, which the trainers are told
(``Cluster.restarts``) and train through.

    python3 examples/python/ray_train.py --workers 2 --steps 300 --kill-shard-at 120

The model learns a planted sum of per-key weights from bags of keys (Zipf-like ids); the result
(losses, restarts seen) is printed as JSON.
"""

import argparse
import json
import os
import tempfile

import numpy as np
import ray
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

import hetkv
import hetkv.ray
import hetkv.torch


@ray.remote(num_cpus=0)
class Results:
    """Where rank 0 leaves its result for the driver."""

    def __init__(self) -> None:
        self.value = None

    def put(self, value: dict) -> None:
        self.value = value

    def get(self) -> dict:
        return self.value


def train_loop(config: dict) -> None:
    """One Ray Train worker: the hetkv table through a cache, a DDP head."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    cluster = hetkv.connect(config["addrs"], timeout=120, wait_for_daemon=120)
    cluster.set_on_rollback("continue")  # a shard's restart is reported, and training goes on
    table = cluster.table(config["table"])
    emb = hetkv.torch.EmbeddingBag(
        table.cached(capacity=0.2, pull_bound=config["bound"], push_bound=config["bound"]), mode="sum"
    )
    torch.manual_seed(config["seed"])
    head = prepare_model(nn.Linear(config["dim"], 1))
    dense = torch.optim.SGD(head.parameters(), lr=0.05)
    emb_opt = hetkv.torch.EmbeddingOptimizer(emb)
    rows = config["rows"]
    truth = torch.from_numpy(np.random.default_rng(config["seed"]).normal(0, 1, rows).astype(np.float32))
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    losses = []
    for step in range(config["steps"]):
        keys = (rows * torch.rand(config["batch"], 4, generator=gen).pow(2)).long()
        y = truth[keys].sum(1, keepdim=True)
        loss = nn.functional.mse_loss(head(emb(keys)), y)
        dense.zero_grad()
        emb_opt.zero_grad()
        loss.backward()
        dense.step()
        emb_opt.step()
        losses.append(loss.item())
        if rank == 0 and step == config["kill_at"]:
            ray.kill(config["kill"], no_restart=False)  # as a crash would; Ray restarts it
        if rank == 0 and step % config["checkpoint_every"] == config["checkpoint_every"] - 1:
            emb.flush()
            cluster.checkpoint(f"step-{step + 1}", incremental=True)
    emb.flush()
    restarts = cluster.restarts()
    if rank == 0:
        ray.get(config["results"].put.remote({
            "first_loss": float(np.mean(losses[:10])),
            "last_loss": float(np.mean(losses[-10:])),
            "restarts_seen": restarts["seen"],
            "pushes_rolled_back": restarts["pushes_rolled_back"],
        }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rows", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bound", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=None, help="the shards' data directories (a temporary one by default)")
    p.add_argument("--kill-shard-at", type=int, default=None, help="the step at which rank 0 kills the last shard's actor")
    a = p.parse_args()

    # A local Ray instance gets logical CPUs for every actor: the shards, the workers and the
    # trainer's own (Ray would otherwise wait for CPUs a small machine does not have).
    ray.init(
        num_cpus=max(os.cpu_count() or 1, a.shards + a.workers + 2),
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=False,
    )
    data_root = a.data_root or tempfile.mkdtemp(prefix="hetkv-ray-")
    shards = hetkv.ray.start_shards(a.shards, data_root)
    try:
        admin = shards.connect()
        admin.create_table("ray_ids", rows=a.rows, dim=a.dim,
                           init=hetkv.Initializer.normal(std=0.01, seed=a.seed),
                           optimizer=hetkv.Optimizer.adagrad(lr=0.1))
        admin.checkpoint("start")  # a parent for the workers' incremental checkpoints
        results = Results.remote()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "addrs": shards.addrs, "table": "ray_ids", "rows": a.rows, "dim": a.dim,
                "batch": a.batch, "bound": a.bound, "steps": a.steps, "seed": a.seed,
                "checkpoint_every": a.checkpoint_every,
                "kill_at": -1 if a.kill_shard_at is None else a.kill_shard_at,
                "kill": shards.actors[-1],
                "results": results,
            },
            scaling_config=ScalingConfig(num_workers=a.workers, use_gpu=False),
        )
        trainer.fit()
        result = ray.get(results.get.remote())
        print(json.dumps(result | {"workers": a.workers, "shards": a.shards}))
    finally:
        shards.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
