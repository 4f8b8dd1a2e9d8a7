"""Checkpoints with the model: ``state_dict()`` carries the tables' rows (a fixed table's as
``nn.Embedding``'s weight, a dynamic table's with its keys; a collection's under TorchRec's
names), ``torch.save``/``torch.load`` round-trip it, and ``load_state_dict`` sets the rows on the
running shards and makes the caches read them again: the model then computes, bit for bit, what
it computed when it was saved, on these shards or on another cluster's new tables. The
``EmbeddingOptimizer``'s state dict carries the shards' optimizer state, so that a run resumed
from both trains on exactly as the saved run went on."""

import io

import numpy as np
import pytest
import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor


class Model(nn.Module):
    def __init__(self, cluster, bound=3):
        super().__init__()
        ids = cluster.create_table("ids", rows=40, dim=4, optimizer=hetkv.Optimizer.adagrad(lr=0.1),
                                   init=hetkv.Initializer.normal(std=0.1, seed=1))
        users = cluster.create_table("users", rows=30, dim=3, optimizer=hetkv.Optimizer.adam(lr=0.05),
                                     init=hetkv.Initializer.normal(std=0.1, seed=2))
        raw = cluster.create_table("raw", rows=256, dim=2, optimizer=hetkv.Optimizer.sgd(lr=0.1),
                                   init=hetkv.Initializer.normal(std=0.1, seed=3),
                                   dynamic=hetkv.Dynamic(eviction="lru"))
        bounds = dict(capacity=0.5, pull_bound=bound, push_bound=bound)
        self.emb = hetkv.torch.Embedding(ids.cached(**bounds))
        self.ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(users.cached(**bounds), ["user"]),
            EmbeddingBagConfig(raw.cached(**bounds), ["raw"], "mean"),
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


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def all_rows(cluster):
    """Every table's rows by key (a dynamic table's sorted by key)."""
    out = {}
    for name in ("ids", "users", "raw"):
        got = cluster.table(name).read_rows()
        if "keys" in got:
            order = np.argsort(got["keys"])
            out[name] = (got["keys"][order], got["embeddings"][order])
        else:
            out[name] = got["embeddings"]
    return out


def same_rows(a, b):
    return all(
        np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])
        if isinstance(a[k], tuple) else np.array_equal(a[k], b[k])
        for k in a
    )


def test_a_run_resumed_from_the_model_s_and_the_optimizer_s_state_dicts_is_the_run_that_went_on():
    # Bounds 0: a cached run is the uncached one, so a fresh cache resumes it bit for bit.
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        model = Model(cluster, bound=0)
        train(model, np.random.default_rng(5), 12)
        saved_model = round_trip(model.state_dict())
        saved_opt = round_trip(hetkv.torch.EmbeddingOptimizer(model).state_dict())
        tables = saved_opt["tables"]
        assert set(tables) == {"ids", "users"}, "the SGD table has no state"
        assert tables["ids"]["sum"].shape == (40, 4)
        assert tables["users"]["exp_avg"].shape == (30, 3)
        assert tables["users"]["exp_avg_sq"].shape == (30, 3)
        assert tables["users"]["step"].dtype == torch.int64 and int(tables["users"]["step"].max()) > 0
        assert float(tables["ids"]["sum"].min()) >= 0 and float(tables["ids"]["sum"].max()) > 0
        train(model, np.random.default_rng(6), 12)
        went_on = all_rows(cluster)
        for order in ("model first", "optimizer first", "rows only"):
            with hetkv.EmbeddedCluster(shards=1) as other:
                fresh = Model(other, bound=0)
                opt = hetkv.torch.EmbeddingOptimizer(fresh)
                if order == "optimizer first":
                    opt.load_state_dict(saved_opt)
                fresh.load_state_dict(saved_model)
                if order == "model first":
                    opt.load_state_dict(saved_opt)
                train(fresh, np.random.default_rng(6), 12)
                resumed = all_rows(other)
                if order == "rows only":
                    # The test can tell: without the optimizer's state the rows differ.
                    assert not same_rows(resumed, went_on)
                else:
                    assert same_rows(resumed, went_on), order


def test_an_optimizer_state_dict_that_does_not_fit_is_refused_before_any_table_changes():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        model = Model(cluster, bound=0)
        train(model, np.random.default_rng(7), 5)
        opt = hetkv.torch.EmbeddingOptimizer(model)
        saved = opt.state_dict()
        before = {n: cluster.table(n).read_rows(state=True) for n in ("ids", "users")}
        no_users = dict(saved, tables={"ids": saved["tables"]["ids"]})
        with pytest.raises(ValueError, match="no optimizer state of table 'users'"):
            opt.load_state_dict(no_users)
        short = dict(saved, tables=dict(saved["tables"], users=dict(
            saved["tables"]["users"], step=saved["tables"]["users"]["step"][:-1])))
        with pytest.raises(ValueError, match="table 'users'"):
            opt.load_state_dict(short)
        with pytest.raises(ValueError, match="tables"):
            opt.load_state_dict({k: v for k, v in saved.items() if k != "tables"})
        # Adagrad's accumulators where the Adam table's moments go (the last table: the first
        # would have been set already, were states not all checked first).
        swapped = dict(saved, tables=dict(saved["tables"], users={"sum": torch.zeros(30, 3)}))
        with pytest.raises(ValueError, match="table 'users' \\(adam\\) has no 'exp_avg'"):
            opt.load_state_dict(swapped)
        wide = dict(saved, tables=dict(saved["tables"], ids={"sum": torch.zeros(40, 5)}))
        with pytest.raises(ValueError, match="table 'ids' \\(adagrad\\) is \\(40, 5\\)"):
            opt.load_state_dict(wide)
        for n in ("ids", "users"):
            after = cluster.table(n).read_rows(state=True)
            for k in before[n]:
                assert np.array_equal(after[k], before[n][k]), (n, k)


def test_a_table_s_state_read_and_set_and_its_bad_input_refused():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        t = cluster.create_table("adam", rows=20, dim=3, optimizer=hetkv.Optimizer.adam(lr=0.01))
        t.push(np.arange(20, dtype=np.uint64), np.full((20, 3), 0.5, dtype=np.float32))
        got = t.read_rows(state=True)
        assert got["state"].shape == (20, 6) and got["steps"].tolist() == [1] * 20
        state = got["state"].copy()
        state[4, 5] = -1.0  # a negative second moment
        with pytest.raises(hetkv.InvalidGradientError, match="key 4"):
            t.assign(got_keys := np.arange(20, dtype=np.uint64), state=state, steps=got["steps"])
        with pytest.raises(hetkv.WrongDimError):
            t.assign(got_keys, state=got["state"][:, :5].copy(), steps=got["steps"])
        with pytest.raises(hetkv.WrongDimError):
            t.assign(got_keys, state=got["state"])  # Adam's steps missing
        with pytest.raises(ValueError, match="steps come with a state"):
            t.assign(got_keys, steps=got["steps"])
        with pytest.raises(ValueError, match="not both"):
            t.assign(got_keys, state=got["state"], steps=got["steps"], keep_state=True)
        assert np.array_equal(t.read_rows(state=True)["state"], got["state"]), "nothing changed"
        # Values set, state kept; then state set, values kept.
        values = np.ones((20, 3), dtype=np.float32)
        t.assign(got_keys, values, keep_state=True)
        after = t.read_rows(state=True)
        assert np.array_equal(after["embeddings"], values)
        assert np.array_equal(after["state"], got["state"])
        assert (after["versions"] == got["versions"] + 1).all()
        t.assign(got_keys, state=np.zeros((20, 6), dtype=np.float32), steps=np.zeros(20, dtype=np.uint64))
        after = t.read_rows(state=True)
        assert np.array_equal(after["embeddings"], values) and not after["state"].any()
        assert not after["steps"].any()
