"""A DLRM-style model on one device: hetkv (an ``EmbeddingBagCollection`` over caches, trained by
``TrainPipeline``) against the same model with every table a ``torch.nn.EmbeddingBag`` on the
device (sparse gradients, the same Adagrad), side by side in one run.

13 dense features through a bottom MLP (13-64-16), Criteo's 26 categorical fields as tables of
their own sizes (cardinality capped at ``--cap``) and dims (16 above 1,000 ids, 8 below), one id
a field a sample drawn skewed, a top MLP (16 + 352 - 256 - 1), binary cross-entropy, Adam for the
dense part, Adagrad (lr 0.05) for the embeddings. hetkv: two in-process shards on loopback TCP,
cache 10%, bounds 100. Each round trains ``--batches`` batches after 10 of warm-up, hetkv then
torch, ``--repeats`` rounds; printed: samples/s of each and their ratio.

    python3 bench/scripts/dlrm_pipeline.py --device cuda     # or cpu
"""

import argparse
import statistics
import time

import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import EmbeddingBagCollection, EmbeddingBagConfig, TrainPipeline

from criteo26 import NAMES, fields, sparse_batch, sync

class Batch:
    def __init__(self, dense, sparse, labels):
        self.dense_features, self.sparse_features, self.labels = dense, sparse, labels

    def to(self, device, non_blocking=False):
        return Batch(
            self.dense_features.to(device, non_blocking=non_blocking),
            self.sparse_features.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self):
        return Batch(self.dense_features.pin_memory(), self.sparse_features, self.labels.pin_memory())


class DLRM(nn.Module):
    def __init__(self, sparse: nn.Module, width: int):
        super().__init__()
        self.sparse = sparse
        self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(16 + width, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, batch):
        pooled = self.sparse(batch.sparse_features)
        if not isinstance(pooled, torch.Tensor):
            pooled = pooled.values()  # a KeyedTensor
        x = torch.cat([self.bottom(batch.dense_features), pooled], dim=1)
        logits = self.top(x).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


class TorchTables(nn.Module):
    """Every table a torch.nn.EmbeddingBag on the device."""

    def __init__(self, rows, dims, device):
        super().__init__()
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(r, d, mode="sum", sparse=True, device=device) for r, d in zip(rows, dims)
        )

    def forward(self, kjt):
        stride = kjt.stride()
        values = kjt.values().reshape(26, stride)
        offsets = torch.arange(stride, device=values.device)
        return torch.cat([b(values[i], offsets) for i, b in enumerate(self.bags)], dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows, dims = fields(args.cap)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(args.batches + 10):
        kjt = sparse_batch(rows, args.batch, gen)
        dense = torch.rand(args.batch, 13, generator=gen)
        labels = (torch.rand(args.batch, generator=gen) < 0.25).float()
        data.append(Batch(dense, kjt, labels))
    rates = {"hetkv + pipeline": [], "torch.nn.EmbeddingBag": []}
    with hetkv.EmbeddedCluster(shards=args.shards) as cluster:
        tables = [
            cluster.create_table(n, rows=r, dim=d, optimizer=hetkv.Optimizer.adagrad(lr=0.05),
                                 init=hetkv.Initializer.normal(std=0.01))
            for n, r, d in zip(NAMES, rows, dims)
        ]
        for _ in range(args.repeats):
            # hetkv: the collection over caches, the pipeline.
            ebc = EmbeddingBagCollection(
                [EmbeddingBagConfig(t.cached(capacity=0.1, pull_bound=100, push_bound=100), [n])
                 for t, n in zip(tables, NAMES)],
                device=dev,
            )
            model = DLRM(ebc, sum(dims)).to(dev)
            pipeline = TrainPipeline(model, torch.optim.Adam(model.parameters(), lr=1e-3), dev)
            it = iter(data)
            for i in range(len(data)):
                if i == 10:
                    sync(dev)
                    start = time.perf_counter()
                pipeline.progress(it)
            sync(dev)
            rates["hetkv + pipeline"].append(args.batches * args.batch / (time.perf_counter() - start))
            ebc.flush()
            # torch: every table on the device.
            model = DLRM(TorchTables(rows, dims, dev), sum(dims)).to(dev)
            dense_opt = torch.optim.Adam(
                [p for n, p in model.named_parameters() if not n.startswith("sparse.")], lr=1e-3
            )
            sparse_opt = torch.optim.Adagrad(model.sparse.parameters(), lr=0.05)
            for i, b in enumerate(data):
                if i == 10:
                    sync(dev)
                    start = time.perf_counter()
                b = b.to(dev, non_blocking=True)
                loss, _ = model(b)
                loss.backward()
                dense_opt.step(); sparse_opt.step()
                dense_opt.zero_grad(); sparse_opt.zero_grad()
            sync(dev)
            rates["torch.nn.EmbeddingBag"].append(args.batches * args.batch / (time.perf_counter() - start))
    for k, v in rates.items():
        print(f"{k:>22}: {statistics.median(v):9.0f} samples/s (runs: {', '.join(f'{x:.0f}' for x in v)})")
    h, t = (statistics.median(v) for v in rates.values())
    print(f"hetkv / torch: {h / t:.2f}x ({dev}, batch {args.batch})")


if __name__ == "__main__":
    main()
