"""hetkv.torch's two update modes side by side, and the step mode's exactness on a device.

1. Four micro-batches (a quarter of the loss each) through a GradScaler at scale 65,536, then one
   step: the rows of ``hetkv.torch.Embedding`` + ``EmbeddingOptimizer`` against
   ``torch.nn.Embedding`` + SGD on the same device (printed: the largest difference), and a
   non-finite step skipped.
2. Samples/s of a lookup-heavy step (batches of 4,096 samples x 26 keys, rows of 16, a table of
   1,000,000 rows with Adagrad, cache 10%, bounds 100, skewed ids; a linear head on the device),
   ``update="backward"`` (fused) and ``update="step"`` in turn, ``--repeats`` times each.

    python3 bench/scripts/torch_update_modes.py --device cuda     # or cpu
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

import hetkv
import hetkv.torch


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def exactness(cluster, dev):
    torch.manual_seed(6)
    rows, dim, lr = 1000, 16, 0.5
    reference = nn.Embedding(rows, dim).to(dev)
    initial = reference.weight.detach().cpu().clone()
    micro = [torch.randint(0, rows, (64, 8)) for _ in range(4)]
    targets = [torch.rand(64, 1, device=dev) for _ in range(4)]
    opt_ref = torch.optim.SGD(reference.parameters(), lr=lr)
    for x, y in zip(micro, targets):
        (nn.functional.mse_loss(reference(x.to(dev)).sum((1, 2)).unsqueeze(1), y) / 4).backward()
    opt_ref.step()
    table = cluster.create_table("exact", rows=rows, dim=dim, optimizer=hetkv.Optimizer.sgd(lr=lr))
    table.assign(np.arange(rows, dtype=np.uint64), initial.numpy())
    emb = hetkv.torch.Embedding(table.cached(capacity=0.5, pull_bound=0, push_bound=0), device=dev)
    opt = hetkv.torch.EmbeddingOptimizer(emb)
    scaler = torch.amp.GradScaler(dev.type, init_scale=65536.0)
    for x, y in zip(micro, targets):
        scaler.scale(nn.functional.mse_loss(emb(x).sum((1, 2)).unsqueeze(1), y) / 4).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    emb.flush()
    keys = np.arange(rows, dtype=np.uint64)
    got = torch.from_numpy(table.pull(keys))
    err = (got - reference.weight.detach().cpu()).abs().max().item()
    print(f"{dev}: largest |hetkv - nn.Embedding| after 4 scaled micro-batches and one step: {err:.3g}")
    assert err < 1e-4, err
    emb(micro[0]).sum().backward()
    emb.grad_carrier.grad = emb.grad_carrier.grad * float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    emb.flush()
    assert torch.equal(torch.from_numpy(table.pull(keys)), got), "the non-finite step was skipped"
    print(f"{dev}: a non-finite step was skipped (scale now {scaler.get_scale():g})")


def speed(cluster, dev, batches, repeats):
    big = cluster.create_table(
        "big", rows=1_000_000, dim=16, optimizer=hetkv.Optimizer.adagrad(lr=0.05),
        init=hetkv.Initializer.normal(std=0.01),
    )
    head = nn.Linear(26 * 16, 1).to(dev)
    dense = torch.optim.Adam(head.parameters())
    gen = torch.Generator().manual_seed(0)
    data = [(1_000_000 * torch.rand(4096, 26, generator=gen).pow(3)).long() for _ in range(batches + 10)]
    rates = {"backward": [], "step": []}
    for _ in range(repeats):
        for mode in ("backward", "step"):
            e = hetkv.torch.Embedding(
                big.cached(capacity=0.1, pull_bound=100, push_bound=100), device=dev, update=mode
            )
            eo = hetkv.torch.EmbeddingOptimizer(e) if mode == "step" else None
            for i, x in enumerate(data):
                if i == 10:
                    sync(dev)
                    t = time.perf_counter()
                loss = head(e(x).reshape(4096, -1)).square().mean()
                dense.zero_grad()
                if eo:
                    eo.zero_grad()
                loss.backward()
                dense.step()
                if eo:
                    eo.step()
            sync(dev)
            rates[mode].append(batches * 4096 / (time.perf_counter() - t))
            e.flush()
    for mode, r in rates.items():
        print(f"{dev}: update={mode}: " + ", ".join(f"{x:,.0f}" for x in r) + " samples/s")
    ratio = np.median(rates["step"]) / np.median(rates["backward"])
    print(f"{dev}: step over backward (medians): {ratio:.3f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    dev = torch.device(a.device)
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if dev.type == "cuda" else "")
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        exactness(cluster, dev)
        speed(cluster, dev, a.batches, a.repeats)


if __name__ == "__main__":
    main()
