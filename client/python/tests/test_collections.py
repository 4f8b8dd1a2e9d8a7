"""``hetkv.torch.EmbeddingBagCollection`` and ``EmbeddingCollection`` over jagged input: a
collection trains exactly as its tables would as separate modules (Adagrad, Adam and SGD tables
of their own dims, sum, mean and max pooling, weights, empty bags), in both update modes, while
reading and updating all of them together; a table shared by two features takes one step of
their summed gradients, as ``torch.nn.EmbeddingBag`` with SGD does; bad input is refused."""

import numpy as np
import pytest
import torch
from torch import nn

import hetkv
import hetkv.torch
from hetkv.torch import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

TABLES = [  # name, rows, dim, optimizer, pooling
    ("ada", 60, 8, hetkv.Optimizer.adagrad(lr=0.05), "sum"),
    ("adam", 40, 4, hetkv.Optimizer.adam(lr=0.01), "mean"),
    ("sgd", 30, 16, hetkv.Optimizer.sgd(lr=0.1), "max"),
]


def batch(rng: np.random.Generator, bags: int, weighted: bool) -> KeyedJaggedTensor:
    """Features f0 (of table ada), f1 (adam), f2 (sgd): 0 to 4 ids a bag (empty bags too)."""
    lengths, values = [], []
    for _, rows, _, _, _ in TABLES:
        n = rng.integers(0, 5, size=bags)
        lengths.append(n)
        values.append(rng.integers(0, rows, size=int(n.sum())))
    values = torch.from_numpy(np.concatenate(values))
    weights = torch.from_numpy(rng.random(len(values)).astype(np.float32)) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1", "f2"], values, torch.from_numpy(np.concatenate(lengths)), weights=weights
    )


def caches(cluster, suffix: str, bounds):
    out = []
    for name, rows, dim, optimizer, _ in TABLES:
        table = cluster.create_table(
            name + suffix, rows=rows, dim=dim, optimizer=optimizer,
            init=hetkv.Initializer.normal(std=0.1, seed=3),
        )
        out.append(table.cached(capacity=0.3, pull_bound=bounds, push_bound=bounds))
    return out


@pytest.mark.parametrize("update", ["step", "backward"])
@pytest.mark.parametrize("bounds", [0, 3])
def test_a_collection_trains_exactly_as_its_tables_as_separate_modules(update, bounds):
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        together = caches(cluster, "_c", bounds)
        alone = caches(cluster, "_s", bounds)
        ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(c, [f"f{i}"], TABLES[i][4]) for i, c in enumerate(together)],
            update=update,
        )
        bags = [
            hetkv.torch.EmbeddingBag(c, mode=TABLES[i][4], update=update)
            for i, c in enumerate(alone)
        ]
        head = nn.Linear(28, 1)
        opt_c = hetkv.torch.EmbeddingOptimizer(ebc) if update == "step" else None
        opt_s = hetkv.torch.EmbeddingOptimizer(bags) if update == "step" else None
        for step in range(12):
            # Weights, which an unweighted collection ignores, now and then.
            kjt = batch(rng, bags=6, weighted=step % 4 == 1)
            pooled = ebc(kjt)
            assert pooled.keys() == ["f0", "f1", "f2"] and pooled.length_per_key() == [8, 4, 16]
            parts = []
            for i, bag in enumerate(bags):
                f = kjt[f"f{i}"]
                parts.append(bag(f.values(), f.offsets()[:-1]))
            separate = torch.cat(parts, dim=1)
            assert torch.equal(pooled.values(), separate), f"step {step}: forward differs"
            assert torch.equal(pooled["f1"], parts[1])
            head(pooled.values()).square().sum().backward()
            head(separate).square().sum().backward()
            if update == "step":
                opt_c.step(); opt_c.zero_grad()
                opt_s.step(); opt_s.zero_grad()
        ebc.flush()
        for b in bags:
            b.flush()
        for i, (name, rows, _, _, _) in enumerate(TABLES):
            keys = np.arange(rows, dtype=np.uint64)
            got = cluster.table(name + "_c").pull(keys)
            want = cluster.table(name + "_s").pull(keys)
            assert np.array_equal(got, want), f"table {name}: rows on the shards differ"
            assert together[i].stats()["rows_pushed"] > 0


def test_a_table_shared_by_two_features_steps_as_torch_embedding_bag_with_sgd():
    torch.manual_seed(1)
    rng = np.random.default_rng(11)
    rows, dim, lr = 20, 4, 0.5
    reference = nn.EmbeddingBag(rows, dim, mode="sum")
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("shared", rows=rows, dim=dim, optimizer=hetkv.Optimizer.sgd(lr=lr))
        table.assign(np.arange(rows, dtype=np.uint64), reference.weight.detach().numpy())
        ebc = EmbeddingBagCollection([EmbeddingBagConfig(table.cached(capacity=1.0, pull_bound=0, push_bound=0), ["a", "b"])])
        opt = hetkv.torch.EmbeddingOptimizer(ebc)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
        for _ in range(5):
            la, lb = rng.integers(0, 4, size=3), rng.integers(0, 4, size=3)
            va, vb = rng.integers(0, rows, size=int(la.sum())), rng.integers(0, rows, size=int(lb.sum()))
            kjt = KeyedJaggedTensor.from_lengths_sync(
                ["a", "b"], torch.from_numpy(np.concatenate([va, vb])), torch.from_numpy(np.concatenate([la, lb]))
            )
            out = ebc(kjt).values()
            ref = torch.cat(
                [reference(torch.from_numpy(v), kjt[f].offsets()[:-1]) for f, v in (("a", va), ("b", vb))], dim=1
            )
            assert torch.allclose(out, ref, atol=1e-6)
            (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
            (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
            opt.step(); opt.zero_grad()
            ref_opt.step(); ref_opt.zero_grad()
        ebc.flush()
        got = table.pull(np.arange(rows, dtype=np.uint64))
        assert np.allclose(got, reference.weight.detach().numpy(), atol=1e-5)


def test_a_weighted_collection_weights_each_id_as_torch_embedding_bag_does():
    rng = np.random.default_rng(5)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        a = cluster.create_table("wa", rows=30, dim=4, init=hetkv.Initializer.normal(std=0.1))
        b = cluster.create_table("wb", rows=30, dim=2, init=hetkv.Initializer.normal(std=0.1))
        ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(a.cached(), ["x"]), EmbeddingBagConfig(b.cached(), ["y"])],
            is_weighted=True,
        )
        lengths = torch.tensor([2, 0, 3, 1, 1, 0])
        values = torch.from_numpy(rng.integers(0, 30, size=7))
        weights = torch.from_numpy(rng.random(7).astype(np.float32))
        kjt = KeyedJaggedTensor.from_lengths_sync(["x", "y"], values, lengths, weights=weights)
        out = ebc(kjt)
        for name, table, lo, hi, bags in (("x", a, 0, 5, [0, 2, 2]), ("y", b, 5, 7, [0, 1, 2])):
            ref = nn.EmbeddingBag.from_pretrained(
                torch.from_numpy(table.pull(np.arange(30, dtype=np.uint64))), mode="sum"
            )
            want = ref(values[lo:hi], torch.tensor(bags), per_sample_weights=weights[lo:hi])
            assert torch.allclose(out[name], want, atol=1e-6)
        with pytest.raises(ValueError, match="weights weight sum"):
            EmbeddingBagCollection([EmbeddingBagConfig(a.cached(), ["x"], "mean")], is_weighted=True)


def test_an_embedding_collection_returns_each_feature_s_rows_with_its_lengths():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        a = cluster.create_table("ea", rows=10, dim=3)
        b = cluster.create_table("eb", rows=10, dim=5)
        ec = EmbeddingCollection([EmbeddingConfig(a.cached(), ["x"]), EmbeddingConfig(b.cached(), ["y"])])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["x", "y"], torch.tensor([1, 2, 2, 9, 0]), torch.tensor([2, 1, 0, 2])
        )
        out = ec(kjt)
        assert out["x"].values().shape == (3, 3) and out["y"].values().shape == (2, 5)
        assert out["x"].lengths().tolist() == [2, 1] and out["y"].lengths().tolist() == [0, 2]
        want = a.pull(np.array([1, 2, 2], dtype=np.uint64))
        assert np.array_equal(out["x"].values().detach().numpy(), want)


def test_bad_collections_and_bad_input_are_refused_clearly():
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        c = cluster.create_table("bad", rows=10, dim=2).cached()
        with pytest.raises(ValueError, match="two tables"):
            EmbeddingBagCollection([EmbeddingBagConfig(c, ["a"]), EmbeddingBagConfig(c, ["b"])])
        d = cluster.create_table("bad2", rows=10, dim=2).cached()
        with pytest.raises(ValueError, match="named by two tables"):
            EmbeddingBagCollection([EmbeddingBagConfig(c, ["a"]), EmbeddingBagConfig(d, ["a"])])
        with pytest.raises(ValueError, match="pooling"):
            EmbeddingBagCollection([EmbeddingBagConfig(c, ["a"], pooling="median")])
        ebc = EmbeddingBagCollection([EmbeddingBagConfig(c, ["a"], "mean")])
        with pytest.raises(KeyError, match="'a' is not in the batch"):
            ebc(KeyedJaggedTensor.from_lengths_sync(["z"], torch.tensor([1]), torch.tensor([1])))
        with pytest.raises(hetkv.KeyOutOfRangeError):
            ebc(KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([10]), torch.tensor([1])))
        with pytest.raises(ValueError, match="lengths sum"):
            KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1]))
        other = hetkv.EmbeddedCluster(shards=1)
        e = other.create_table("elsewhere", rows=10, dim=2).cached()
        mixed = EmbeddingBagCollection([EmbeddingBagConfig(c, ["a"]), EmbeddingBagConfig(e, ["b"])])
        with pytest.raises(ValueError, match="another cluster"):
            mixed(KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2]), torch.tensor([1, 1])))
        with pytest.raises(ValueError, match="given twice"):
            hetkv.lookup_many([c, c], [np.array([1], dtype=np.uint64)] * 2)
        other.close()


def test_a_collection_reads_and_steps_every_table_in_one_request_a_shard():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        configs = []
        for i in range(5):
            t = cluster.create_table(f"r{i}", rows=100, dim=4, optimizer=hetkv.Optimizer.adagrad(lr=0.1))
            # Bounds 0: every update is pushed at the step.
            configs.append(EmbeddingBagConfig(t.cached(capacity=0.5, pull_bound=0, push_bound=0), [f"f{i}"]))
        ebc = EmbeddingBagCollection(configs)
        opt = hetkv.torch.EmbeddingOptimizer(ebc)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            [f"f{i}" for i in range(5)], torch.arange(40) % 100, torch.full((20,), 2)
        )
        requests = lambda: [s["requests"] for s in cluster.stats()]  # noqa: E731
        before = requests()
        ebc(kjt).values().sum().backward()
        after_lookup = requests()
        opt.step(); opt.zero_grad()
        after_step = requests()
        # One batch a shard, and the stats request that counted it.
        assert [a - b for a, b in zip(after_lookup, before)] == [2, 2]
        assert [a - b for a, b in zip(after_step, after_lookup)] == [2, 2]
