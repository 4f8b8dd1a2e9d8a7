"""Ray Train over hetkv shards that Ray runs: the recipe for a Ray cluster.

The shards are Ray actors (``hetkv.ray.start_shards``: one a node where there are several, each
with its data directory, restarted by Ray when it dies, restoring its newest checkpoint); the
trainers are Ray Train's ``TorchTrainer`` workers (DDP for the dense part through
``ray.train.torch.prepare_model``, each worker's cache for the embeddings), connected to the
shards' addresses.

Every ``--checkpoint-every`` steps the workers meet, rank 0 checkpoints the cluster (so a shard
that dies comes back from there) and reports the job's checkpoint to Ray Train: the model's state
dict (the table's rows with the dense head), the embedding optimizer's (the shards' Adagrad state)
and the dense optimizer's. A shard's restart takes back the pushes after its checkpoint, which
the trainers are told of (``set_on_rollback("error")``): they fail, Ray Train starts them again
(``FailureConfig``), and they resume from the job's checkpoint, setting the rows and their
optimizer state on the running shards, so the run ends where an undisturbed one does.

    python3 examples/python/ray_train.py --workers 2 --steps 200 --kill-shard-at 80

The model learns a planted logistic model over bags of keys (Zipf-like ids); the result (losses,
held-out AUC, where it resumed) is printed as JSON.
"""

import argparse
import json
import os
import tempfile

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

import hetkv
import hetkv.ray
import hetkv.torch


@ray.remote(num_cpus=0)
class Results:
    """Where rank 0 leaves its result, and the run its kill, for the driver."""

    def __init__(self) -> None:
        self.value = None
        self.killed = False

    def put(self, value: dict) -> None:
        self.value = value

    def get(self) -> dict:
        return self.value

    def kill_once(self) -> bool:
        """Whether this call is the first: the shard is killed once, not again on resume."""
        first, self.killed = not self.killed, True
        return first


def batch(config: dict, rank: int, step: int):
    """Rank ``rank``'s batch at ``step``: the same on every run, so a resumed run replays it."""
    gen = torch.Generator().manual_seed((config["seed"] * 1_000_003 + rank) * 1_000_003 + step)
    keys = (config["rows"] * torch.rand(config["batch"], 4, generator=gen).pow(2)).long()
    return keys, labels(config, keys, gen)


def labels(config: dict, keys: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Labels drawn from the planted model: P(y = 1) = sigmoid(the keys' weights summed)."""
    truth = torch.from_numpy(
        np.random.default_rng(config["seed"]).normal(0, 1, config["rows"]).astype(np.float32)
    )
    p = torch.sigmoid(truth[keys].sum(1, keepdim=True))
    return (torch.rand(p.shape, generator=gen) < p).float()


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """The area under the ROC curve: the chance a positive scores above a negative (ties half),
    from the scores' ranks (Mann-Whitney)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train_loop(config: dict) -> None:
    """One Ray Train worker: the hetkv table through a cache, a DDP head."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    cluster = hetkv.connect(config["addrs"], timeout=120, wait_for_daemon=120)
    # A shard's restart that took back acknowledged pushes fails the step: Ray Train then starts
    # the workers again, and they resume from the job's checkpoint below.
    cluster.set_on_rollback("error")
    table = cluster.table(config["table"])
    emb = hetkv.torch.EmbeddingBag(
        table.cached(capacity=0.2, pull_bound=config["bound"], push_bound=config["bound"]), mode="sum"
    )
    torch.manual_seed(config["seed"])
    head = prepare_model(nn.Linear(config["dim"], 1))
    dense = torch.optim.SGD(head.parameters(), lr=0.05)
    emb_opt = hetkv.torch.EmbeddingOptimizer(emb)
    start, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, "job.pt"), weights_only=False)
        head.load_state_dict(saved["head"])
        dense.load_state_dict(saved["dense"])
        if rank == 0:
            # The rows and their optimizer state, set on the running shards (one rank is
            # enough: every worker reads them through its cache from here on).
            emb.load_state_dict(saved["emb"])
            emb_opt.load_state_dict(saved["emb_opt"])
        dist.barrier()
        start = resumed_from = saved["step"]
    losses = []
    for step in range(start, config["steps"]):
        keys, y = batch(config, rank, step)
        loss = nn.functional.binary_cross_entropy_with_logits(head(emb(keys)), y)
        dense.zero_grad()
        emb_opt.zero_grad()
        loss.backward()
        dense.step()
        emb_opt.step()
        losses.append(loss.item())
        if step + 1 < config["steps"] and (step + 1) % config["checkpoint_every"] == 0:
            save(config, rank, step + 1, cluster, emb, head, emb_opt, dense)
        if rank == 0 and step == config["kill_at"] and ray.get(config["results"].kill_once.remote()):
            ray.kill(config["kill"], no_restart=False)  # as a crash would; Ray restarts it
    emb.flush()
    dist.barrier()
    if rank == 0:
        # Held out: 16 batches of a rank no worker is.
        test = [batch(config, rank=10_000, step=s) for s in range(16)]
        emb.eval()
        with torch.no_grad():
            scores = np.concatenate([head(emb(k)).squeeze(1).numpy() for k, _ in test])
        ray.get(config["results"].put.remote({
            "first_loss": float(np.mean(losses[:10])) if start == 0 else None,
            "last_loss": float(np.mean(losses[-10:])),
            "test_auc": auc(scores, np.concatenate([y.squeeze(1).numpy() for _, y in test])),
            "resumed_from": resumed_from,
            "restarts_seen": cluster.restarts()["seen"],
        }))


def save(config, rank, step, cluster, emb, head, emb_opt, dense) -> None:
    """The job's checkpoint at ``step``, every worker's updates in: the cluster's (each shard's
    rows, for a shard that restarts) and Ray Train's (the state dicts, to resume the job from)."""
    import ray.train

    emb.flush()
    dist.barrier()  # every worker's pushes are in
    if rank == 0:
        cluster.checkpoint(f"step-{step}", incremental=True)
        with tempfile.TemporaryDirectory() as d:
            torch.save({
                "step": step,
                "emb": emb.state_dict(),
                "emb_opt": emb_opt.state_dict(),
                "head": head.state_dict(),
                "dense": dense.state_dict(),
            }, os.path.join(d, "job.pt"))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report({"step": step})
    dist.barrier()  # no worker pushes before the rows were read


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
            run_config=RunConfig(
                storage_path=os.path.join(data_root, "ray-train"),
                failure_config=FailureConfig(max_failures=2),
            ),
        )
        trainer.fit()
        result = ray.get(results.get.remote())
        print(json.dumps(result | {"workers": a.workers, "shards": a.shards}))
    finally:
        shards.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
