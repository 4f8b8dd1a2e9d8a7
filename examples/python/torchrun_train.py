"""Training under torchrun against running shards: the recipe for several ranks.

The shards are started once, outside the job (one ``hetkv serve`` per shard), and every rank
connects to the same addresses; the dense part is DDP's, the embeddings are hetkv's (each rank's
cache pushes its own gradients, which the shards' optimizer applies). ``hetkv.EmbeddedCluster``
refuses to start under several ranks: each rank would train a table of its own.

    hetkv serve --listen 127.0.0.1:7070 --shard 0 --shards 2 &
    hetkv serve --listen 127.0.0.1:7071 --shard 1 --shards 2 &
    torchrun --nproc_per_node 2 examples/python/torchrun_train.py \\
        --servers 127.0.0.1:7070,127.0.0.1:7071 --out result.json

or, with shards named by a pattern (a StatefulSet's pods: deploy/kubernetes),
``--servers 'hetkv-{i}.hetkv:7070' --shards 2 --auth-token-file /etc/hetkv/auth/token``.

The model learns a planted sum of per-key weights from bags of keys (Zipf-like ids); rank 0
writes the losses, every rank's updates and the table's versions to ``--out`` (JSON).
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import hetkv
import hetkv.torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--servers",
        default=os.environ.get("HETKV_SERVERS", ""),
        help="host:port,... of every shard, or a pattern with {i} (hetkv-{i}.hetkv:7070) and --shards",
    )
    p.add_argument("--shards", type=int, default=None, help="the shard count, with a --servers pattern")
    p.add_argument("--auth-token-file", default=None, help="the daemons' token, when they require one")
    p.add_argument("--table", default="torchrun_ids")
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bound", type=int, default=10, help="pull and push bound of each rank's cache")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="rank 0 writes the result here (JSON)")
    a = p.parse_args()
    if not a.servers:
        raise SystemExit("--servers (or HETKV_SERVERS) names the running shards")

    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    token = None
    if a.auth_token_file:
        with open(a.auth_token_file) as f:
            token = f.read().strip()
    servers = a.servers if "{i}" in a.servers else a.servers.split(",")
    cluster = hetkv.connect(servers, auth_token=token, shards=a.shards)
    if rank == 0:
        cluster.create_table(
            a.table, rows=a.rows, dim=a.dim,
            init=hetkv.Initializer.normal(std=0.01, seed=a.seed),
            optimizer=hetkv.Optimizer.adagrad(lr=0.1),
        )
    dist.barrier()
    table = cluster.table(a.table)
    emb = hetkv.torch.EmbeddingBag(
        table.cached(capacity=0.1, pull_bound=a.bound, push_bound=a.bound), mode="sum"
    )
    torch.manual_seed(a.seed)  # the same dense initialisation on every rank
    head = nn.parallel.DistributedDataParallel(nn.Linear(a.dim, 1))
    dense = torch.optim.SGD(head.parameters(), lr=0.05)
    emb_opt = hetkv.torch.EmbeddingOptimizer(emb)

    # The planted model: each key's weight; a sample's target is the sum over its bag.
    truth = torch.from_numpy(np.random.default_rng(a.seed).normal(0, 1, a.rows).astype(np.float32))
    gen = torch.Generator().manual_seed(a.seed * 1000 + rank)  # each rank its own data
    losses, updates = [], 0
    for _ in range(a.steps):
        keys = (a.rows * torch.rand(a.batch, 4, generator=gen).pow(2)).long()
        y = truth[keys].sum(1, keepdim=True)
        loss = nn.functional.mse_loss(head(emb(keys)), y)
        dense.zero_grad()
        emb_opt.zero_grad()
        loss.backward()
        dense.step()
        emb_opt.step()
        losses.append(loss.item())
        updates += len(torch.unique(keys))
    emb.flush()
    dist.barrier()  # every rank's updates are on the shards

    heads = [None] * world
    dist.all_gather_object(heads, [t.detach().tolist() for t in head.module.parameters()])
    counts = [None] * world
    dist.all_gather_object(counts, updates)
    if rank == 0:
        versions = np.zeros(a.rows, dtype=np.uint64)
        table.pull(np.arange(a.rows, dtype=np.uint64), versions=versions)
        result = {
            "world": world,
            "first_loss": float(np.mean(losses[:10])),
            "last_loss": float(np.mean(losses[-10:])),
            "updates_per_rank": counts,
            "versions_sum": int(versions.sum()),
            "heads_in_sync": all(h == heads[0] for h in heads),
        }
        print(json.dumps(result))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
