#!/usr/bin/env python3
"""DeepFM in PyTorch on the Criteo-like data set, with its embeddings in hetkv.

Make the data, then train (CPU, or a GPU with --device cuda):

    hetkv-bench criteo --samples 400000 --tsv criteo.tsv --json criteo.json
    python examples/python/deepfm.py --tsv criteo.tsv --report criteo.json

The categorical fields share one hetkv table of rows ``1 + dim`` (a first-order weight and the
factors, as HET's DeepFM has it), read through ``hetkv.torch.Embedding`` over a cache (10% of
the rows, bounds 100, by default; ``--cache 0 --bound 0`` is the classic parameter server) and
trained by the table's optimizer on the shards, which ``hetkv.torch.EmbeddingOptimizer`` steps
beside the dense optimizer. The dense part (MLP, dense features) trains with
torch. ``--torch-embedding`` trains the same model with ``torch.nn.Embedding`` wholly on the
device instead: the upper bound when a table fits. The report says samples/s, the test AUC and
logloss over time, and the planted model's AUC from ``criteo.json`` (the ceiling).

Without ``--cluster`` the shards run in this process (``hetkv.EmbeddedCluster``).

Under ``torchrun`` (HET's topology: one trainer a GPU, all sharing the shards) every rank trains
its share of each epoch's samples with a cache of its own (``--batch`` samples a rank a step),
the dense part in DDP over gloo; rank 0 creates the table, evaluates and writes the report, whose
samples/s and embedding bytes are summed over the ranks. ``--cluster`` is then required.

    torchrun --nproc-per-node 8 examples/python/deepfm.py --tsv criteo.tsv --report criteo.json \
        --cluster 10.0.0.1:7000,10.0.0.1:7001 --transport tcp --device cuda

``--raw-ids`` keys the table by raw 64-bit feature ids, as a log carries them (each field's
value hashed with the field, negative above 2^63 as torch's int64 holds them), in a dynamic
table of ``--raw-capacity`` rows (admission always, LFU eviction): no vocabulary, no
``hash % buckets + offset`` mapping to keep beside the model.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

import torch.distributed as dist

import hetkv
import hetkv.torch

FIELDS = 26
DENSE = 13


MASK = (1 << 64) - 1


def raw_id(field, value):
    """The raw 64-bit id of `value` (the field's hex string, or None when missing) in `field`:
    a SplitMix64 mix of both, as torch's int64 holds it (negative above 2^63)."""
    z = ((field << 56) ^ (int(value, 16) if value else MASK >> 8)) & MASK
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


def read_tsv(path, field_ids, raw=False):
    """Labels, dense features (log(1 + x)) and global keys of a Criteo TSV file; keys map each
    field's id into its range of the table (the last row of a field stands for "missing"), as
    ``hetkv-bench`` does, or with `raw` are raw 64-bit ids ([`raw_id`])."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(field_ids, dtype=np.int64) + 1)[:-1]])
    labels, dense, keys = [], [], []
    with open(path) as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 1 + DENSE + FIELDS:
                continue
            labels.append(float(cols[0]))
            dense.append([math.log1p(max(0, int(c))) if c else 0.0 for c in cols[1 : 1 + DENSE]])
            row = []
            for field, c in enumerate(cols[1 + DENSE :]):
                ids = field_ids[field]
                if raw:
                    row.append(raw_id(field, c))
                else:
                    row.append(offsets[field] + (int(c, 16) % ids if c else ids))
            keys.append(row)
    return (
        torch.tensor(labels, dtype=torch.float32),
        torch.tensor(dense, dtype=torch.float32),
        torch.tensor(np.asarray(keys, dtype=np.int64)),
    )


def auc(scores, labels):
    """The area under the ROC curve (rank statistic, ties averaged)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


class DeepFM(nn.Module):
    """First-order weights, FM interactions and an MLP over the factors and dense features."""

    def __init__(self, embedding, dim, hidden):
        super().__init__()
        self.embedding = embedding  # keys (B, 26) -> (B, 26, 1 + dim)
        self.dim = dim
        self.dense_linear = nn.Linear(DENSE, 1)
        layers, width = [], FIELDS * dim + DENSE
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, keys, dense):
        rows = self.embedding(keys)
        first, v = rows[..., 0], rows[..., 1:]
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1, keepdim=True)
        deep = self.mlp(torch.cat([v.reshape(len(dense), -1), dense], 1))
        return first.sum(1, keepdim=True) + self.dense_linear(dense) + fm + deep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tsv", required=True, help="Criteo TSV (hetkv-bench criteo --tsv)")
    p.add_argument("--report", required=True, help="its JSON report (hetkv-bench criteo --json)")
    p.add_argument("--npz", help="keep the parsed data here and read it from here next time")
    p.add_argument("--cluster", help="comma-separated shard addresses (default: shards in this process)")
    p.add_argument("--shards", type=int, default=2, help="embedded shards (without --cluster)")
    p.add_argument("--table", default="deepfm_emb", help="the embedding table's name (a new one per run)")
    p.add_argument("--transport", default="auto", help="auto, tcp, shm or rdma")
    p.add_argument("--emulated-link-gbps", type=float, help="hold the TCP link to each shard to this bandwidth (emulated)")
    p.add_argument("--dim", type=int, default=8, help="factors per field (rows hold 1 + dim)")
    p.add_argument("--hidden", default="256,256,256", help="MLP widths")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05, help="the embeddings' Adagrad learning rate")
    p.add_argument("--dense-lr", type=float, default=1e-3, help="the dense part's Adam learning rate")
    p.add_argument("--cache", type=float, default=0.1, help="cache capacity, a fraction of the rows (0: none)")
    p.add_argument("--bound", type=int, default=100, help="pull and push bounds")
    p.add_argument("--torch-embedding", action="store_true", help="torch.nn.Embedding on the device instead of hetkv")
    p.add_argument("--raw-ids", action="store_true", help="raw 64-bit ids in a dynamic table (see the module's doc)")
    p.add_argument("--raw-capacity", type=int, help="the dynamic table's rows with --raw-ids (default: the ids' count)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=float, default=0.0, help="seconds between test evaluations (0: at the end)")
    p.add_argument("--eval-samples", type=int, default=20000)
    p.add_argument("--target-auc", type=float, help="report the time to reach this test AUC")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not args.cluster or args.torch_embedding:
            sys.exit("under torchrun the ranks share running shards: give --cluster (hetkv, not --torch-embedding)")
        dist.init_process_group("gloo")  # gloo reduces CUDA tensors too: ranks may share one GPU
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    with open(args.report) as f:
        report = json.load(f)
    if args.raw_ids and args.torch_embedding:
        sys.exit("--raw-ids keys a hetkv dynamic table; torch.nn.Embedding needs dense keys")
    def load():
        if args.npz and os.path.exists(args.npz):
            parsed = np.load(args.npz)
            return tuple(torch.from_numpy(parsed[k]) for k in ("labels", "dense", "keys"))
        got = read_tsv(args.tsv, report["field_ids"], raw=args.raw_ids)
        if args.npz:
            part = args.npz + f".{os.getpid()}.npz"  # whole or absent under its name
            np.savez(part, labels=got[0].numpy(), dense=got[1].numpy(), keys=got[2].numpy())
            os.replace(part, args.npz)
        return got

    if world > 1 and args.npz:
        # Rank 0 parses once and keeps the arrays; the others read them.
        if rank == 0:
            labels, dense, keys = load()
        dist.barrier()
        if rank != 0:
            labels, dense, keys = load()
    else:
        labels, dense, keys = load()
    rows = int(report["table_rows"])
    if args.raw_ids:
        rows = args.raw_capacity or rows
    elif int(keys.max()) >= rows:
        sys.exit(f"a key {int(keys.max())} is outside the table of {rows} rows: is --report this file's?")
    n_test = max(1, int(len(labels) * args.test_fraction))
    train, test = slice(0, len(labels) - n_test), slice(len(labels) - n_test, len(labels))
    test_idx = torch.arange(len(labels))[test][: args.eval_samples]

    cluster = None
    if args.torch_embedding:
        # Sparse gradients, as a practitioner trains a large table with torch alone.
        embedding = nn.Embedding(rows, 1 + args.dim, sparse=True)
        nn.init.normal_(embedding.weight, std=0.01)
        what = "torch.nn.Embedding on " + str(device)
    else:
        if args.cluster:
            cluster = hetkv.connect(
                args.cluster.split(","), transport=args.transport, emulated_link_gbps=args.emulated_link_gbps
            )
        else:
            cluster = hetkv.EmbeddedCluster(shards=args.shards)
        if rank == 0:
            table = cluster.create_table(
                args.table,
                rows=rows,
                dim=1 + args.dim,
                init=hetkv.Initializer.normal(std=0.01, seed=args.seed),
                optimizer=hetkv.Optimizer.adagrad(lr=args.lr),
                dynamic=hetkv.Dynamic(eviction="lfu") if args.raw_ids else None,
            )
        if world > 1:
            dist.barrier()  # rank 0 created it
            table = cluster.table(args.table)
        capacity = 0 if args.cache <= 0 else args.cache
        cache = table.cached(capacity=capacity, policy="lfu", pull_bound=args.bound, push_bound=args.bound)
        # Keys stay on the host; the rows go to the model's device.
        embedding = hetkv.torch.Embedding(cache, device=device)
        what = f"hetkv ({'raw ids, ' if args.raw_ids else ''}cache {args.cache:g}, bounds {args.bound}, {len(cluster.addrs)} shards" + (
            f", emulated {args.emulated_link_gbps:g} Gbit/s link)" if args.emulated_link_gbps else ")"
        )
    hidden = [int(h) for h in args.hidden.split(",") if h]
    model = DeepFM(embedding, args.dim, hidden).to(device)
    dense_params = [q for n, q in model.named_parameters() if not (args.torch_embedding and n.startswith("embedding"))]
    # The dense part averaged over the ranks each step (the hetkv module holds no parameter).
    step_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(dense_params, lr=args.dense_lr)
    if args.torch_embedding:
        emb_opt = torch.optim.Adagrad(model.embedding.parameters(), lr=args.lr)
    else:
        # The table's own Adagrad on the shards, stepped at each step's end as torch steps.
        emb_opt = hetkv.torch.EmbeddingOptimizer(model.embedding)
    loss_fn = nn.BCEWithLogitsLoss()

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(keys[b] if not args.torch_embedding else keys[b].to(device), dense[b].to(device))
                    .squeeze(1)
                    .cpu()
                    for b in test_idx.split(4096)
                ]
            )
        model.train()
        prob = torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)
        y = labels[test_idx]
        logloss = float(-(y * prob.log() + (1 - y) * (1 - prob).log()).mean())
        return auc(prob.numpy(), y.numpy()), logloss

    timeline, trained, reached = [], 0, None
    started = time.monotonic()
    next_eval = args.eval_every if args.eval_every > 0 else float("inf")
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        order = torch.arange(train.stop)[torch.randperm(train.stop, generator=gen)]
        if world > 1:
            # Each rank's share, in whole steps for all (a DDP step waits for every rank).
            steps = len(order) // (args.batch * world)
            order = order[: steps * args.batch * world][rank::world]
        for b in order.split(args.batch):
            k = keys[b] if not args.torch_embedding else keys[b].to(device)
            x, y = dense[b].to(device), labels[b].to(device)
            loss = loss_fn(step_model(k, x).squeeze(1), y)
            opt.zero_grad()
            emb_opt.zero_grad()
            loss.backward()
            opt.step()
            emb_opt.step()
            trained += len(b) * world
            elapsed = time.monotonic() - started
            if rank == 0 and elapsed >= next_eval:
                a, l = evaluate()
                timeline.append({"secs": elapsed, "samples": trained, "auc": a, "logloss": l})
                print(f"{elapsed:7.1f} s  {trained:9d} samples  test AUC {a:.4f}  logloss {l:.4f}", flush=True)
                if reached is None and args.target_auc and a >= args.target_auc:
                    reached = elapsed
                next_eval = elapsed + args.eval_every
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_secs = time.monotonic() - started
    if not args.torch_embedding:
        embedding.flush()
    if world > 1:
        dist.barrier()  # every rank's updates are in
    final_auc, final_logloss = evaluate()
    if reached is None and args.target_auc and final_auc >= args.target_auc:
        reached = train_secs
    out = {
        "embedding": what,
        "device": str(device),
        "dim": args.dim,
        "batch": args.batch,
        "samples": trained,
        "train_secs": train_secs,
        "samples_per_s": trained / train_secs,
        "test_auc": final_auc,
        "test_logloss": final_logloss,
        "planted_auc": report["oracle_auc"],
        "planted_logloss": report["oracle_logloss"],
        "time_to_target": reached,
        "timeline": timeline,
    }
    if not args.torch_embedding:
        out["cache"] = embedding.cache.stats()
        # The cache's bytes to and from the shards, under torchrun every rank's summed.
        s = out["cache"]
        moved = torch.tensor([s["bytes_sent"], s["bytes_received"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(moved)
        out["world"] = world
        out["bytes_sent"], out["bytes_received"] = (int(v) for v in moved.tolist())
    if rank != 0:
        dist.destroy_process_group()
        return out
    print(
        f"{what}: {out['samples_per_s']:.0f} samples/s, test AUC {final_auc:.4f} (planted model "
        f"{report['oracle_auc']:.4f}), logloss {final_logloss:.4f}"
        + (f", target reached after {reached:.1f} s" if reached is not None else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if isinstance(cluster, hetkv.EmbeddedCluster):
        cluster.close()
    if world > 1:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
