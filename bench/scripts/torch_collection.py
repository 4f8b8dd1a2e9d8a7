"""26 tables of their own sizes and dims, as a DLRM-style model reads them: one
``hetkv.torch.EmbeddingBag`` a table (a request a table and shard) against one
``hetkv.torch.EmbeddingBagCollection`` of them all (a request a shard), and both against the
fields fused by hand into one table of dim 16 (one ``hetkv.torch.Embedding``, one request a
shard, one dim and one optimizer forced on every field), side by side in one run.

Criteo's 26 categorical fields, each a table of its field's cardinality (capped at ``--cap``
rows), dim 16 for fields above 1,000 ids and 8 below, Adagrad on the shards; one id a field a
sample, drawn skewed (``rows * u^3``); a linear head on the device; cache 10%, bounds 100. Each
round trains ``--batches`` batches (after 10 of warm-up) with per-table modules, then with the
collection, each on fresh caches of the same tables; ``--repeats`` rounds. Printed: samples/s of
each, their ratio, and requests a batch.

    python3 bench/scripts/torch_collection.py --device cpu     # or cuda
"""

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import EmbeddingBagCollection, EmbeddingBagConfig

from criteo26 import NAMES, fields, sparse_batch, sync

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap", type=int, default=200_000)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows, dims = fields(args.cap)
    names = NAMES
    gen = torch.Generator().manual_seed(1)
    data = [sparse_batch(rows, args.batch, gen) for _ in range(args.batches + 10)]
    offsets = torch.arange(args.batch)
    with hetkv.EmbeddedCluster(shards=args.shards) as cluster:
        tables = [
            cluster.create_table(
                n, rows=r, dim=d, optimizer=hetkv.Optimizer.adagrad(lr=0.05),
                init=hetkv.Initializer.normal(std=0.01),
            )
            for n, r, d in zip(names, rows, dims)
        ]

        fused_table = cluster.create_table(
            "fused", rows=sum(rows), dim=16, optimizer=hetkv.Optimizer.adagrad(lr=0.05),
            init=hetkv.Initializer.normal(std=0.01),
        )
        field_at = torch.tensor(np.cumsum([0] + rows[:-1])).unsqueeze(0)

        def caches():
            return [t.cached(capacity=0.1, pull_bound=100, push_bound=100) for t in tables]

        def per_table():
            mods = [hetkv.torch.EmbeddingBag(c, mode="sum", device=dev) for c in caches()]

            def forward(kjt):
                return torch.cat(
                    [m(kjt[n].values(), offsets) for m, n in zip(mods, names)], dim=1
                )

            return forward, hetkv.torch.EmbeddingOptimizer(mods), mods

        def collection():
            ebc = EmbeddingBagCollection(
                [EmbeddingBagConfig(c, [n]) for c, n in zip(caches(), names)], device=dev
            )
            return (lambda kjt: ebc(kjt).values()), hetkv.torch.EmbeddingOptimizer(ebc), [ebc]

        def fused():
            emb = hetkv.torch.Embedding(
                fused_table.cached(capacity=0.1, pull_bound=100, push_bound=100), device=dev
            )

            def forward(kjt):
                ids = kjt.values().reshape(26, -1).t() + field_at  # batch x 26, offset by field
                return emb(ids).reshape(len(ids), -1)

            return forward, hetkv.torch.EmbeddingOptimizer(emb), [emb]

        builds = (("per-table modules", per_table), ("collection", collection), ("one fused table", fused))
        rates = {label: [] for label, _ in builds}
        requests = {}
        for _ in range(args.repeats):
            for label, build in builds:
                forward, opt, mods = build()
                head = nn.LazyLinear(1).to(dev)
                head(forward(data[0]).detach())  # the lazy head takes its input's width
                dense = torch.optim.Adam(head.parameters())
                for i, kjt in enumerate(data):
                    if i == 10:
                        sync(dev)
                        before = sum(s["requests"] for s in cluster.stats())
                        start = time.perf_counter()
                    y = head(forward(kjt))
                    loss = y.square().mean()
                    loss.backward()
                    dense.step(); opt.step()
                    dense.zero_grad(); opt.zero_grad()
                sync(dev)
                took = time.perf_counter() - start
                rates[label].append(args.batches * args.batch / took)
                requests[label] = (sum(s["requests"] for s in cluster.stats()) - before) / args.batches
                for m in mods:
                    m.flush()
        per, col, one = (
            statistics.median(rates[k]) for k in ("per-table modules", "collection", "one fused table")
        )
        for k, v in rates.items():
            print(f"{k:>18}: {statistics.median(v):9.0f} samples/s (runs: {', '.join(f'{x:.0f}' for x in v)}); {requests[k]:.1f} requests a batch over {args.shards} shards")
        print(f"collection / per-table modules: {col / per:.2f}x; collection / one fused table: {col / one:.2f}x")


if __name__ == "__main__":
    main()
