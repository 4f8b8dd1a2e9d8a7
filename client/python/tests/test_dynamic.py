"""Dynamic tables from Python: raw 64-bit ids as torch carries them (int64, negative above 2^63)
and as numpy uint64, admission after a count of updates, the capacity as ``rows``, caches and
``hetkv.torch`` modules over raw int64 ids, and bad arguments refused by name."""

import numpy as np
import pytest

import hetkv


def test_raw_int64_ids_are_their_u64_bit_patterns_and_admission_counts_updates():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table(
            "raw",
            rows=10_000,
            dim=4,
            init=hetkv.Initializer.normal(std=0.1, seed=2),
            optimizer=hetkv.Optimizer.adagrad(lr=0.1),
            dynamic=hetkv.Dynamic(eviction="lfu", admit_after=2),
        )
        assert table.dynamic is not None and table.rows == 10_000
        # The issue's own id, and the extremes: as torch's int64 holds them.
        ids = np.array([-6973240437940254719, -1, 0, 1, 2**62], dtype=np.int64)
        as_u64 = ids.view(np.uint64)
        grads = np.full((len(ids), 4), 0.5, dtype=np.float32)
        versions = np.zeros(len(ids), dtype=np.uint64)

        # The first update of each key is counted, not applied: its rows stay at their
        # initial values, and the answer names every key refused.
        report = table.push_report(ids, grads)
        assert report["applied"] == 0
        np.testing.assert_array_equal(report["refused_keys"], as_u64)
        np.testing.assert_array_equal(report["refused_counts"], np.ones(len(ids), dtype=np.uint32))
        before = table.pull(as_u64, versions=versions)
        assert (versions == 0).all()
        # The second admits every key: int64 and uint64 name the same rows.
        report = table.push_report(as_u64, grads)
        assert report["applied"] == len(ids) and len(report["refused_keys"]) == 0
        after_i64 = table.pull(ids, versions=versions)
        assert (versions == 1).all()
        after_u64 = table.pull(as_u64)
        np.testing.assert_array_equal(after_i64, after_u64)
        assert (after_u64 < before).all(), "a positive gradient moved every row down"


def test_the_eviction_stream_and_an_export_name_every_key(tmp_path):
    import safetensors.numpy

    with hetkv.EmbeddedCluster(shards=1) as cluster:
        # 64 rows over 2 placement buckets: one region bucket of 32 each.
        table = cluster.create_table(
            "small",
            rows=64,
            dim=2,
            buckets=2,
            optimizer=hetkv.Optimizer.sgd(0.1),
            dynamic=hetkv.Dynamic(),
        )
        ids = np.arange(1, 1001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        table.push(ids, np.ones((len(ids), 2), dtype=np.float32))
        seen = []
        cursor = 0
        while True:
            page = table.evictions(0, cursor, max=100)
            assert page["lost"] == 0
            if len(page["keys"]) == 0:
                break
            assert (page["versions"] == 1).all()
            seen.extend(int(k) for k in page["keys"])
            cursor = page["next"]
        assert table.export(tmp_path / "small.safetensors") == 64
        held = safetensors.numpy.load_file(str(tmp_path / "small.safetensors"))["keys"]
        assert len(seen) == len(ids) - 64, "every key not held was evicted once"
        assert sorted(seen + [int(k) for k in held]) == sorted(int(k) for k in ids)


def test_caches_and_torch_modules_take_raw_int64_ids():
    torch = pytest.importorskip("torch")
    import hetkv.torch

    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table(
            "ids",
            rows=1000,
            dim=4,
            buckets=8,
            init=hetkv.Initializer.normal(std=0.1, seed=3),
            optimizer=hetkv.Optimizer.sgd(lr=0.5),
            dynamic=hetkv.Dynamic(),
        )
        # Raw ids as a DataLoader yields them: int64, negative above 2^63, one of them twice.
        ids = torch.tensor([[-6973240437940254719, 0, 5], [2**63 - 1, -1, 5]])
        flat = ids.reshape(-1).numpy()
        emb = hetkv.torch.Embedding(table.cached(capacity=0.5, pull_bound=0, push_bound=0))
        out = emb(ids)
        before = table.pull(flat)
        np.testing.assert_array_equal(out.detach().reshape(-1, 4).numpy(), before)
        out.sum().backward()
        hetkv.torch.EmbeddingOptimizer(emb).step()
        emb.flush()
        after = table.pull(flat)
        # SGD at 0.5 of a gradient of ones per occurrence: id 5, there twice, moved twice as far.
        counts = np.array([1, 1, 2, 1, 1, 2], dtype=np.float32)[:, None]
        np.testing.assert_allclose(before - after, 0.5 * counts * np.ones((1, 4)), rtol=1e-5)
        # The cache's lookups now read the trained rows.
        np.testing.assert_array_equal(emb(ids).detach().reshape(-1, 4).numpy(), after)


def test_what_dynamic_tables_do_not_offer_yet_is_refused_by_name():
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        table = cluster.create_table(
            "d", rows=100, dim=2, optimizer=hetkv.Optimizer.sgd(0.1), dynamic=hetkv.Dynamic()
        )
        with pytest.raises(ValueError, match="lru"):
            hetkv.Dynamic(eviction="fifo")
        with pytest.raises(ValueError, match="not both"):
            hetkv.Dynamic(admit_after=2, admit_probability=0.5)
        with pytest.raises(ValueError, match="admit_after"):
            hetkv.Dynamic(admit_after=300)
        with pytest.raises(TypeError, match="uint64 or int64"):
            table.pull(np.array([1.0, 2.0]))
        with pytest.raises(ValueError, match="ttl=N"):
            hetkv.Dynamic(eviction="ttl")
        with pytest.raises(ValueError, match="eviction=\"ttl\""):
            hetkv.Dynamic(eviction="lru", ttl=5)
        with pytest.raises(ValueError, match="at least 1"):
            hetkv.Dynamic(eviction="ttl", ttl=0)
        # A table without a time to live keeps no training step.
        with pytest.raises(hetkv.RemoteError, match="time to live"):
            table.advance_step(3)


def test_a_time_to_live_evicts_rows_not_updated_within_it_and_reads_refresh_nothing():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table(
            "ttl", rows=4096, dim=2, optimizer=hetkv.Optimizer.sgd(0.1),
            init=hetkv.Initializer.normal(std=0.1, seed=3),
            dynamic=hetkv.Dynamic(eviction="ttl", ttl=10),
        )
        old = np.arange(-50, 50, dtype=np.int64) * 7919
        new = np.arange(50, 150, dtype=np.int64) * 7919
        grads = np.full((100, 2), 0.5, dtype=np.float32)
        table.push(old, grads)                 # at step 0
        assert table.advance_step(5) == 0
        table.push(new, grads)                 # at step 5
        versions = np.zeros(100, dtype=np.uint64)
        table.pull(old, versions=versions)     # reads refresh nothing
        assert (versions == 1).all()
        assert table.advance_step(12) == 100   # step 0 + 10 < 12: the old keys expire
        table.pull(old, versions=versions)
        assert (versions == 0).all()
        table.pull(new, versions=versions)
        assert (versions == 1).all()
        held = table.read_rows()
        assert set(held["keys"].tolist()) == set(new.view(np.uint64).tolist())
        gone = [table.evictions(s)["keys"] for s in range(2)]
        assert sorted(np.concatenate(gone).tolist()) == sorted(old.view(np.uint64).tolist())
