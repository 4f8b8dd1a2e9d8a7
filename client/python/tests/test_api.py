"""The Python API against the Rust client: rows read through Python equal rows read through
Rust (the ``hetkv export`` command), caches within their bounds, checkpoints, and an embedded
cluster started and stopped many times in one process."""

import os
import subprocess

import numpy as np
import pytest
import safetensors.numpy

import hetkv
from conftest import hetkv_binary


def test_rows_read_through_python_equal_rows_read_through_rust(tmp_path):
    with hetkv.EmbeddedCluster(shards=3) as cluster:
        table = cluster.create_table(
            "ads",
            rows=1000,
            dim=16,
            init=hetkv.Initializer.normal(std=0.1, seed=3),
            optimizer=hetkv.Optimizer.adam(lr=0.01),
        )
        rng = np.random.default_rng(1)
        for _ in range(20):
            keys = rng.integers(0, 1000, size=64).astype(np.uint64)
            keys = np.unique(keys)
            table.push(keys, rng.standard_normal((len(keys), 16)).astype(np.float32))
        all_keys = np.arange(1000, dtype=np.uint64)
        versions = np.zeros(1000, dtype=np.uint64)
        rows = table.pull(all_keys, versions=versions)
        assert rows.shape == (1000, 16) and rows.dtype == np.float32
        out = tmp_path / "ads.safetensors"
        subprocess.run(
            [str(hetkv_binary()), "export", "--cluster", ",".join(cluster.addrs), "--table", "ads", "--out", str(out)],
            check=True,
            capture_output=True,
        )
        exported = safetensors.numpy.load_file(str(out))
        np.testing.assert_array_equal(exported["embeddings"], rows)
        np.testing.assert_array_equal(exported["versions"], versions)
        assert versions.sum() > 0


def test_pull_writes_into_a_given_array_without_a_new_one():
    with hetkv.EmbeddedCluster(shards=2, tables=[{"name": "t", "rows": 10, "dim": 4}]) as cluster:
        table = cluster.table("t")
        keys = np.array([3, 1, 3], dtype=np.uint64)
        table.push(keys[:2], np.ones((2, 4), dtype=np.float32))
        out = np.full((3, 4), 7.0, dtype=np.float32)
        assert table.pull(keys, out=out) is out
        np.testing.assert_allclose(out, -0.01)  # the default optimizer: SGD, lr 0.01


def test_a_cache_holds_its_bounds_and_flush_applies_everything():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=100, dim=2, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        writer = table.cached(capacity=20, policy="lru", pull_bound=3, push_bound=3)
        reader = table.cached(capacity=20, policy="lfu", pull_bound=3, push_bound=0)
        keys = np.array([5], dtype=np.uint64)
        reader.lookup(keys)
        for i in range(1, 21):
            writer.update(keys, np.full((1, 2), -1.0, dtype=np.float32))
            versions = np.zeros(1, dtype=np.uint64)
            table.pull(keys, versions=versions)
            assert i - versions[0] <= 3, "the write bound"
            seen = reader.lookup(keys)[0, 0]
            assert versions[0] - seen <= 3, "the read bound (row value counts its updates)"
        writer.flush()
        np.testing.assert_array_equal(table.pull(keys), [[20.0, 20.0]])
        s = writer.stats()
        assert s["updates"] == 20 and s["rows_pushed"] > 0 and 0 <= s["hit_rate"] <= 1


def test_set_bounds_raises_and_lowers_the_bounds_of_a_cache():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=100, dim=2, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        cache = table.cached(capacity=20, pull_bound=0, push_bound=0)
        assert cache.bounds == (0, 0)
        keys = np.array([7], dtype=np.uint64)
        grad = np.full((1, 2), -1.0, dtype=np.float32)
        versions = np.zeros(1, dtype=np.uint64)
        cache.lookup(keys)  # the key's line is resident from here on
        cache.update(keys, grad)
        table.pull(keys, versions=versions)
        assert versions[0] == 1, "bounds 0: every update pushed"
        cache.set_bounds(None, 10)
        assert cache.bounds == (None, 10)
        for _ in range(5):
            cache.update(keys, grad)
        table.pull(keys, versions=versions)
        assert versions[0] == 1, "push bound 10: five updates stay in the line"
        np.testing.assert_array_equal(cache.lookup(keys), [[6.0, 6.0]])
        cache.set_bounds(0, 2)
        table.pull(keys, versions=versions)
        assert versions[0] == 6, "a lowered push bound pushes the lines above it"
        assert cache.bounds == (0, 2)


def test_a_prefetched_lookup_includes_the_updates_made_while_it_was_in_flight():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=100, dim=2, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        cache = table.cached(capacity=10, policy="lru", pull_bound=100, push_bound=100)
        now, after = np.arange(4, dtype=np.uint64), np.array([2, 3, 50, 60], dtype=np.uint64)
        cache.lookup(now)
        cache.prefetch(after)
        # Made while the prefetch is in flight: cached keys 2, 3 and key 60 (not cached yet).
        cache.update(np.array([2, 3, 60], dtype=np.uint64), np.ones((3, 2), dtype=np.float32))
        rows = cache.lookup(after)
        np.testing.assert_array_equal(rows[:, 0], [-1, -1, 0, -1])
        s = cache.stats()
        assert s["prefetched"] == 1 and s["prefetches_unused"] == 0
        cache.flush()
        versions = np.zeros(4, dtype=np.uint64)
        np.testing.assert_array_equal(table.pull(after, versions=versions)[:, 0], [-1, -1, 0, -1])
        np.testing.assert_array_equal(versions, [1, 1, 0, 1])


@pytest.mark.parametrize(
    "rule, server",
    [
        # The push of 2 updates whole.
        ("push-whole", -5.0),
        # Weighted 1/2 + share (3/6) x 1/2 = 3/4.
        ("share-weighted", -4.5),
    ],
)
def test_update_rules_combine_two_workers_updates_of_a_key(rule, server):
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=100, dim=1, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        a = table.cached(capacity=10, pull_bound=0, push_bound=100, update_rule=rule)
        b = table.cached(capacity=10, pull_bound=0, push_bound=0)
        key, one = np.array([7], dtype=np.uint64), np.ones((1, 1), dtype=np.float32)
        a.lookup(key)
        a.update(key, one)
        for _ in range(3):
            b.update(key, one)
        b.flush()
        assert a.lookup(key)[0, 0] == -4.0, "refreshed: the shards' -3 and the pending update"
        a.update(key, one)
        assert a.lookup(key)[0, 0] == -5.0, "the line shows its own updates whole"
        a.flush()
        versions = np.zeros(1, dtype=np.uint64)
        assert table.pull(key, versions=versions)[0, 0] == server
        assert versions[0] == 5, "every update counted once under every rule"
        assert a.lookup(key)[0, 0] == server, "the push left the line the row it produced"


def test_update_rule_arguments_are_checked():
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        table = cluster.create_table("t", rows=10, dim=1, optimizer=hetkv.Optimizer.sgd(0.1))
        for rule in ["summed", "extrapolated", "push-scaled:0", "push-scaled:nan"]:
            with pytest.raises(ValueError, match="unknown update rule"):
                table.cached(update_rule=rule)
        table.cached(update_rule="push-scaled:0.25")


OPTIMIZERS = [
    hetkv.Optimizer.sgd(0.1),
    hetkv.Optimizer.adagrad(0.1),
    hetkv.Optimizer.rowwise_adagrad(0.1),
    hetkv.Optimizer.adam(0.01),
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_a_cache_at_bounds_0_trains_the_rows_no_cache_trains(optimizer):
    # Ten updates of 1e-3 (and a few more keys, repeated within batches) through a cache at bounds
    # 0 and through none: the same rows, bit for bit, whatever the optimizer.
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        init = hetkv.Initializer.normal(0.1, seed=3)
        cached = cluster.create_table("cached", rows=50, dim=8, init=init, optimizer=optimizer)
        plain = cluster.create_table("plain", rows=50, dim=8, init=init, optimizer=optimizer)
        a = cached.cached(capacity=20, pull_bound=0, push_bound=0)
        b = plain.cached(capacity=0, pull_bound=0, push_bound=0)
        rng = np.random.default_rng(5)
        for step in range(10):
            keys = np.array([3, 3, 7] + list(rng.integers(0, 50, 5)), dtype=np.uint64)
            grads = np.full((len(keys), 8), 1e-3, dtype=np.float32)
            grads[3:] = rng.normal(0, 0.01, (len(keys) - 3, 8)).astype(np.float32)
            np.testing.assert_array_equal(a.lookup(keys), b.lookup(keys), err_msg=f"step {step}")
            a.update(keys, grads)
            b.update(keys, grads)
        all_keys = np.arange(50, dtype=np.uint64)
        np.testing.assert_array_equal(cached.pull(all_keys), plain.pull(all_keys))
        # A line is the shards' row, not an approximation of it.
        np.testing.assert_array_equal(a.lookup(np.array([3], dtype=np.uint64)), cached.pull(np.array([3], dtype=np.uint64)))


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_after_a_flush_a_lone_workers_lines_are_the_shards_rows(optimizer):
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=30, dim=4, optimizer=optimizer)
        cache = table.cached(capacity=30, pull_bound=None, push_bound=50)
        keys = np.arange(30, dtype=np.uint64)
        rng = np.random.default_rng(1)
        for _ in range(20):
            cache.lookup(keys)
            cache.update(keys, rng.normal(0, 0.1, (30, 4)).astype(np.float32))
        cache.flush()
        np.testing.assert_array_equal(cache.lookup(keys), table.pull(keys))


def test_optimizer_parameters_are_checked_and_defaults_have_one_home():
    for make, message in [
        (lambda: hetkv.Optimizer.sgd(0.0), "optimizer sgd: lr must be finite and > 0"),
        (lambda: hetkv.Optimizer.adagrad(0.1, eps=0.0), "optimizer adagrad: eps"),
        (lambda: hetkv.Optimizer.rowwise_adagrad(0.1, initial_accumulator=-1.0), "initial_accumulator"),
        (lambda: hetkv.Optimizer.adam(0.1, beta2=1.0), "optimizer adam: beta2 must be in"),
        (lambda: hetkv.Optimizer.adam(float("nan")), "lr must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    assert hetkv.Optimizer.adagrad(0.1) == hetkv.Optimizer.adagrad(0.1, eps=1e-10, initial_accumulator=0.0)
    assert hetkv.Optimizer.adam(0.1) == hetkv.Optimizer.adam(0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    assert hetkv.Optimizer.rowwise_adagrad(0.1) == hetkv.Optimizer.rowwise_adagrad(0.1, eps=1e-8)
    assert "eps=1e-10" in repr(hetkv.Optimizer.adagrad(0.1))


def test_a_table_created_without_an_optimizer_says_what_it_got(caplog):
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        with caplog.at_level("WARNING", logger="hetkv"):
            table = cluster.create_table("t", rows=10, dim=1)
        assert "no optimizer given, the shards apply sgd(lr=0.01)" in caplog.text
        assert table.optimizer == hetkv.Optimizer.sgd(0.01)


def test_capacity_zero_with_bounds_zero_is_the_classic_parameter_server():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=10, dim=1, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        ps = table.cached(capacity=0, pull_bound=0, push_bound=0)
        keys = np.array([2, 2, 3], dtype=np.uint64)
        ps.update(keys, np.ones((3, 1), dtype=np.float32))
        # Written through at once: one update per occurrence.
        versions = np.zeros(3, dtype=np.uint64)
        np.testing.assert_array_equal(table.pull(keys, versions=versions)[:, 0], [-2, -2, -1])
        np.testing.assert_array_equal(versions, [2, 2, 1])
        assert ps.stats()["capacity"] == 0


def test_checkpoints_are_written_and_restored(tmp_path):
    with hetkv.EmbeddedCluster(shards=2, data_dir=tmp_path) as cluster:
        table = cluster.create_table("t", rows=10, dim=2)
        table.assign(np.array([4], dtype=np.uint64), np.array([[1.5, 2.5]], dtype=np.float32))
        done = cluster.checkpoint("c1")
        assert [d["name"] for d in done] == ["c1", "c1"] and sum(d["rows"] for d in done) == 10
    with hetkv.EmbeddedCluster(shards=2, data_dir=tmp_path) as again:
        np.testing.assert_array_equal(again.table("t").pull(np.array([4], dtype=np.uint64)), [[1.5, 2.5]])


def test_other_processes_connect_to_an_embedded_cluster(daemon_factory):
    with hetkv.EmbeddedCluster(shards=2, tables=[{"name": "t", "rows": 10, "dim": 1}]) as cluster:
        cluster.table("t").push(np.array([1], dtype=np.uint64), np.ones((1, 1), dtype=np.float32))
        out = subprocess.run(
            [str(hetkv_binary()), "stats", "--cluster", ",".join(cluster.addrs)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert "t" in out.stdout


def test_an_embedded_cluster_starts_and_stops_cleanly_many_times():
    def threads():
        return len(os.listdir("/proc/self/task"))

    with hetkv.EmbeddedCluster(shards=2):
        pass
    before = threads()
    for i in range(30):
        cluster = hetkv.EmbeddedCluster(shards=2, tables=[{"name": "t", "rows": 100, "dim": 4}])
        assert cluster.running
        keys = np.arange(10, dtype=np.uint64)
        cluster.table("t").cached(capacity=0.5).lookup(keys)
        cluster.close()
        assert not cluster.running
        cluster.close()  # closing twice is fine
    assert threads() <= before + 4, f"threads grew from {before} to {threads()}"
    with pytest.raises(hetkv.ConnectionError):
        hetkv.connect(cluster.addrs, timeout=0.5)


def test_export_and_import_through_python(tmp_path):
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("src", rows=50, dim=3, init=hetkv.Initializer.uniform(0.5, seed=9))
        table.push(np.array([7], dtype=np.uint64), np.ones((1, 3), dtype=np.float32))
        path = tmp_path / "src.safetensors"
        assert table.export(path) == 50
        loaded = safetensors.numpy.load_file(str(path))
        np.testing.assert_array_equal(loaded["embeddings"], table.pull(np.arange(50, dtype=np.uint64)))
        assert loaded["versions"][7] == 1
        some = tmp_path / "some.safetensors"
        assert table.export(some, keys=np.array([9, 3], dtype=np.uint64)) == 2
        np.testing.assert_array_equal(safetensors.numpy.load_file(str(some))["keys"], [9, 3])

        copy = cluster.create_table("copy", rows=50, dim=3)
        assert copy.import_file(path) == 50
        np.testing.assert_array_equal(copy.pull(np.arange(50, dtype=np.uint64)), loaded["embeddings"])
        not_a_file = tmp_path / "junk"
        not_a_file.write_bytes(b"\x00" * 64)
        with pytest.raises(hetkv.Error, match="not a safetensors file"):
            copy.import_file(not_a_file)
        with pytest.raises(hetkv.WrongDimError):
            cluster.create_table("wide", rows=50, dim=4).import_file(path)
        with pytest.raises(hetkv.KeyOutOfRangeError):
            table.export(some, keys=np.array([50], dtype=np.uint64))


def test_an_emulated_link_holds_transfers_to_its_bandwidth():
    with hetkv.EmbeddedCluster(shards=1, tables=[{"name": "t", "rows": 200, "dim": 1000}]) as cluster:
        slow = hetkv.connect(cluster.addrs, emulated_link_gbps=0.01)  # 1.25 MB/s each way
        keys = np.arange(100, dtype=np.uint64)  # 100 rows of 4000 bytes: 0.4 MB
        import time

        started = time.monotonic()
        rows = slow.table("t").pull(keys)
        took = time.monotonic() - started
        assert rows.shape == (100, 1000)
        # 0.4 MB less the 64 KiB burst at 1.25 MB/s: at least 0.26 s, however fast the machine.
        assert took >= 0.25, took
        with pytest.raises(ValueError):
            hetkv.connect(cluster.addrs, emulated_link_gbps=0)


def test_drop_table_frees_the_name_and_every_handle_then_fails():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("dropme", rows=10, dim=2, optimizer=hetkv.Optimizer.sgd(lr=1.0))
        cache = table.cached(capacity=1.0)
        keys = np.array([1, 2], dtype=np.uint64)
        cache.lookup(keys)
        cluster.drop_table("dropme")
        with pytest.raises(hetkv.UnknownTableError):
            cluster.table("dropme")
        with pytest.raises(hetkv.UnknownTableError):
            table.pull(keys)
        with pytest.raises(hetkv.UnknownTableError):
            cluster.drop_table("dropme")
        again = cluster.create_table("dropme", rows=5, dim=3)
        assert again.pull(keys).shape == (2, 3)
