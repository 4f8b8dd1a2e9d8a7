"""``hetkv.torch.TrainPipeline``: the next batch's lookups travel while this batch trains, every
table's in one request a shard with the last step's pushes, and at bounds 0 the pipelined run is
the unpipelined one bit for bit (outputs, dense weights and the tables' rows on the shards); an
unused prefetch of a collection warns once."""

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, TrainPipeline


@dataclasses.dataclass
class Batch:
    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device, non_blocking=False):
        return Batch(
            self.dense_features.to(device, non_blocking=non_blocking),
            self.sparse_features.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )


class Model(nn.Module):
    """A small DLRM: dense features through a linear layer, pooled embeddings beside them."""

    def __init__(self, ebc: EmbeddingBagCollection, width: int):
        super().__init__()
        self.ebc = ebc
        self.bottom = nn.Linear(3, 4)
        self.top = nn.Linear(4 + width, 1)

    def forward(self, batch: Batch):
        pooled = self.ebc(batch.sparse_features).values()
        logits = self.top(torch.cat([self.bottom(batch.dense_features), pooled], dim=1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def batches(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(0, 4, size=2 * 8)
        values = np.concatenate([
            rng.integers(0, 50, size=int(lengths[:8].sum())),
            rng.integers(0, 30, size=int(lengths[8:].sum())),
        ])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["user", "item"], torch.from_numpy(values), torch.from_numpy(lengths)
        )
        out.append(Batch(
            torch.from_numpy(rng.random((8, 3)).astype(np.float32)), kjt,
            torch.from_numpy(rng.integers(0, 2, size=8).astype(np.float32)),
        ))
    return out


def model(cluster, suffix: str, bounds: int) -> Model:
    users = cluster.create_table("users" + suffix, rows=50, dim=4,
                                 optimizer=hetkv.Optimizer.adagrad(lr=0.1),
                                 init=hetkv.Initializer.normal(std=0.1, seed=1))
    items = cluster.create_table("items" + suffix, rows=30, dim=6,
                                 optimizer=hetkv.Optimizer.adam(lr=0.01),
                                 init=hetkv.Initializer.normal(std=0.1, seed=2))
    ebc = EmbeddingBagCollection([
        EmbeddingBagConfig(users.cached(capacity=0.4, pull_bound=bounds, push_bound=bounds), ["user"]),
        EmbeddingBagConfig(items.cached(capacity=0.4, pull_bound=bounds, push_bound=bounds), ["item"], "mean"),
    ])
    return Model(ebc, 10)


def test_a_pipelined_run_at_bounds_0_is_the_unpipelined_one_bit_for_bit():
    torch.manual_seed(3)
    data = batches(20, seed=4)
    # Each model on shards of its own (the same tables, the same initial rows), so that the
    # pipelined one's requests are counted alone.
    with hetkv.EmbeddedCluster(shards=2) as plain_cluster, hetkv.EmbeddedCluster(shards=2) as cluster:
        plain = model(plain_cluster, "", 0)
        piped = model(cluster, "", 0)
        piped.load_state_dict(plain.state_dict())
        dense_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
        emb_plain = hetkv.torch.EmbeddingOptimizer(plain)
        pipeline = TrainPipeline(piped, torch.optim.SGD(piped.parameters(), lr=0.1))
        it = iter(data)
        before = [s["requests"] for s in cluster.stats()]
        for i, batch in enumerate(data):
            loss, want = plain(batch)
            loss.backward()
            dense_plain.step(); emb_plain.step()
            dense_plain.zero_grad(); emb_plain.zero_grad()
            got = pipeline.progress(it)
            assert torch.equal(got, want), f"batch {i}: outputs differ"
        with pytest.raises(StopIteration):
            pipeline.progress(it)
        # Both tables' lookups and pushes of a batch in at most one request a shard (none where
        # the table clocks vouch for every cached row): at most 20 prefetches and the last
        # step's push (no prefetch left to carry it) over the run, besides the stats request
        # that counts them.
        sent = [a - b - 1 for a, b in zip((s["requests"] for s in cluster.stats()), before)]
        assert all(0 < n <= 21 for n in sent), sent
        stats = [c.cache.stats() for c in piped.ebc._configs]
        assert all(s["prefetched"] == 20 and s["prefetches_unused"] == 0 for s in stats)
        for a, b in zip(plain.parameters(), piped.parameters()):
            assert torch.equal(a, b)
        plain.ebc.flush(); piped.ebc.flush()
        for name, rows in (("users", 50), ("items", 30)):
            keys = np.arange(rows, dtype=np.uint64)
            assert np.array_equal(
                plain_cluster.table(name).pull(keys), cluster.table(name).pull(keys)
            ), name


def test_a_collection_warns_once_when_a_prefetch_goes_unused():
    data = batches(3, seed=9)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        m = model(cluster, "", 2)
        m.ebc.prefetch(data[0].sparse_features)
        with pytest.warns(RuntimeWarning, match="prefetch of the collection went unused"):
            m.ebc(data[1].sparse_features)
        m.ebc.prefetch(data[1].sparse_features)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m.ebc(data[2].sparse_features)  # unused again: not repeated
            m.ebc.prefetch(data[0].sparse_features)
            m.ebc(data[0].sparse_features)


def test_a_pipeline_needs_to_know_what_feeds_the_model_s_hetkv_modules():
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        table = cluster.create_table("single", rows=10, dim=2)
        emb = hetkv.torch.Embedding(table.cached())
        with pytest.raises(ValueError, match="inputs="):
            TrainPipeline(emb, None)
        pipeline = TrainPipeline(emb, None, inputs=lambda b: [(emb, b)])
        assert pipeline.embedding_optimizer is not None
