"""Checkpoints with the model: ``state_dict()`` carries the tables' rows (a fixed table's as
``nn.Embedding``'s weight, a dynamic table's with its keys; a collection's under TorchRec's
names), ``torch.save``/``torch.load`` round-trip it, and ``load_state_dict`` sets the rows on the
running shards and makes the caches read them again: the model then computes, bit for bit, what
it computed when it was saved, on these shards or on another cluster's new tables."""

import io

import numpy as np
import pytest
import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor


class Model(nn.Module):
    def __init__(self, cluster):
        super().__init__()
        ids = cluster.create_table("ids", rows=40, dim=4, optimizer=hetkv.Optimizer.adagrad(lr=0.1),
                                   init=hetkv.Initializer.normal(std=0.1, seed=1))
        users = cluster.create_table("users", rows=30, dim=3, optimizer=hetkv.Optimizer.adam(lr=0.05),
                                     init=hetkv.Initializer.normal(std=0.1, seed=2))
        raw = cluster.create_table("raw", rows=256, dim=2, optimizer=hetkv.Optimizer.sgd(lr=0.1),
                                   init=hetkv.Initializer.normal(std=0.1, seed=3),
                                   dynamic=hetkv.Dynamic(eviction="lru"))
        self.emb = hetkv.torch.Embedding(ids.cached(capacity=0.5, pull_bound=3, push_bound=3))
        self.ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(users.cached(capacity=0.5, pull_bound=3, push_bound=3), ["user"]),
            EmbeddingBagConfig(raw.cached(capacity=0.5, pull_bound=3, push_bound=3), ["raw"], "mean"),
        ])
        self.head = nn.Linear(4 + 3 + 2, 1)

    def forward(self, ids, kjt):
        return self.head(torch.cat([self.emb(ids), self.ebc(kjt).values()], dim=1)).squeeze(1)


def batch(rng):
    ids = torch.from_numpy(rng.integers(0, 40, size=8))
    lengths = rng.integers(0, 3, size=16)
    users = rng.integers(0, 30, size=int(lengths[:8].sum()))
    raw = rng.integers(-2**63, 2**63 - 1, size=int(lengths[8:].sum()), dtype=np.int64) % 50 * 7919
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "raw"], torch.from_numpy(np.concatenate([users, raw])), torch.from_numpy(lengths)
    )
    return ids, kjt


def train(model, rng, steps):
    emb_opt = hetkv.torch.EmbeddingOptimizer(model)
    dense = torch.optim.SGD(model.head.parameters(), lr=0.1)
    for _ in range(steps):
        ids, kjt = batch(rng)
        model(ids, kjt).square().sum().backward()
        dense.step(); emb_opt.step()
        dense.zero_grad(); emb_opt.zero_grad()


def test_a_state_dict_round_trip_gives_the_saved_model_bit_for_bit():
    rng = np.random.default_rng(12)
    probe = [batch(np.random.default_rng(99)) for _ in range(3)]
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        model = Model(cluster)
        train(model, rng, 15)
        saved = model.state_dict()
        assert saved["emb.weight"].shape == (40, 4)
        assert saved["ebc.embedding_bags.users.weight"].shape == (30, 3)
        assert saved["ebc.embedding_bags.raw.keys"].dtype == torch.int64
        assert len(saved["ebc.embedding_bags.raw.keys"]) > 0
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
        model.eval()
        with torch.no_grad():
            want = [model(ids, kjt) for ids, kjt in probe]
        model.train()
        train(model, rng, 15)  # the rows move on
        with torch.no_grad():
            assert not torch.equal(model.eval()(*probe[0]), want[0])
        model.train()
        model.load_state_dict(loaded)
        model.eval()
        with torch.no_grad():
            for (ids, kjt), w in zip(probe, want):
                assert torch.equal(model(ids, kjt), w)
        rows = cluster.table("ids").read_rows()["embeddings"]
        assert np.array_equal(rows, loaded["emb.weight"].numpy())
        # Another cluster's new tables, the same specs: the same model again.
        with hetkv.EmbeddedCluster(shards=1) as other:
            fresh = Model(other)
            fresh.load_state_dict(loaded)
            fresh.eval()
            with torch.no_grad():
                for (ids, kjt), w in zip(probe, want):
                    assert torch.equal(fresh(ids, kjt), w)


def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing():
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        model = Model(cluster)
        saved = model.state_dict()
        before = cluster.table("ids").read_rows()["embeddings"]
        bad = dict(saved, **{"emb.weight": torch.zeros(39, 4)})
        with pytest.raises(RuntimeError, match="size mismatch for emb.weight"):
            model.load_state_dict(bad)
        assert np.array_equal(cluster.table("ids").read_rows()["embeddings"], before)
        missing = {k: v for k, v in saved.items() if k != "ebc.embedding_bags.raw.keys"}
        with pytest.raises(RuntimeError, match="Missing key"):
            model.load_state_dict(missing)
