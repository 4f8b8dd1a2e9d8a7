"""Cross-check of `hetkv-bench cache-sweep`'s online ceiling, independent of the Rust code.

The reference workload (1,000,000 ids, Zipf(1.05), batches of 4,096 draws, 200 warm-up and 500
measured batches): before each measured batch, cache exactly the 100,000 ids seen in the most
earlier batches (exact counts, ties broken at random), and count hits over the batch's unique ids.
Its own random stream, so it agrees with the Rust figure statistically, not draw for draw.

    pip install numpy && python3 bench/scripts/online_lfu_ceiling.py
"""
import numpy as np

rng = np.random.default_rng(1)
N, S, BATCH, WARMUP, MEASURED, CAPACITY = 1_000_000, 1.05, 4096, 200, 500, 100_000
p = np.arange(1, N + 1, dtype=np.float64) ** -S
cdf = np.cumsum(p / p.sum())
counts = np.zeros(N, dtype=np.int64)
hits = unique = 0
for b in range(WARMUP + MEASURED):
    ids = np.unique(np.minimum(np.searchsorted(cdf, rng.random(BATCH)), N - 1))
    if b >= WARMUP:
        top = np.argpartition(-(counts + rng.random(N) * 0.5), CAPACITY)[:CAPACITY]
        cached = np.zeros(N, dtype=bool)
        cached[top] = True
        hits += int(cached[ids].sum())
        unique += len(ids)
    counts[ids] += 1
print(f"online LFU ceiling (exact counts): {hits / unique:.4f}")
