"""Shards named by the platform: ``hetkv serve --identity statefulset|indexed-job|slurm`` takes
its index (and Slurm's count) from what Kubernetes or Slurm gives each process, and a client
connects to a cluster by a pattern (a StatefulSet's pod names), checking each shard is the one
its place names."""

import os
import random
import subprocess

import numpy as np
import pytest

import hetkv
from conftest import Daemon, hetkv_binary


def test_shards_named_by_the_platform_are_found_by_a_pattern():
    for attempt in range(5):
        lead, tail = random.randint(2, 5), random.randint(100, 999)
        port = lambda i: f"{lead}{i}{tail}"  # noqa: E731
        try:
            a = Daemon("--identity", "statefulset", "--shards", "2", listen=f"127.0.0.1:{port(0)}",
                       env={"HOSTNAME": "hetkv-store-0"})
        except RuntimeError:
            continue  # the port was taken: another one
        try:
            b = Daemon("--identity", "indexed-job", "--shards", "2", listen=f"127.0.0.1:{port(1)}",
                       env={"JOB_COMPLETION_INDEX": "1"})
        except RuntimeError:
            a.close()
            continue
        break
    else:
        pytest.fail("no free pair of ports")
    try:
        assert any("the StatefulSet ordinal of hetkv-store-0" in l for l in a.log), a.log
        cluster = hetkv.connect(f"127.0.0.1:{lead}{{i}}{tail}", shards=2)
        assert cluster.addrs == [a.addr, b.addr]
        table = cluster.create_table("named", rows=10, dim=2)
        assert table.pull(np.arange(10, dtype=np.uint64)).shape == (10, 2)
        with pytest.raises(hetkv.ProtocolError, match="is shard 1 of 2, but is listed as shard 0"):
            hetkv.connect([b.addr, a.addr])
        with pytest.raises(ValueError, match="shards=N"):
            hetkv.connect("127.0.0.1:{i}")
        with pytest.raises(ValueError, match="no \\{i\\}"):
            hetkv.connect("127.0.0.1:7070", shards=2)
    finally:
        a.close()
        b.close()


def test_a_platform_identity_that_is_missing_stops_the_daemon_with_its_name():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        [str(hetkv_binary()), "serve", "--identity", "slurm", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert out.returncode != 0 and "SLURM_NTASKS" in out.stderr, out.stderr
    env["SLURM_NTASKS"], env["SLURM_PROCID"] = "2", "2"
    out = subprocess.run(
        [str(hetkv_binary()), "serve", "--identity", "slurm", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert out.returncode != 0 and "not below the shard count 2" in out.stderr, out.stderr


def test_three_shards_started_as_a_statefulset_train_and_reshard_onto_four(tmp_path):
    """Three daemons as a StatefulSet starts them (hostnames and --shards only, no index typed),
    found by a pattern; a table trained through a cache, checkpointed; the daemons stopped, the
    checkpoint moved onto four data directories, four daemons started the same way: every row
    reads back equal, versions and all."""
    import signal

    def statefulset(n, lead, tail, data):
        daemons = []
        for i in range(n):
            daemons.append(Daemon(
                "--identity", "statefulset", "--shards", str(n), "--data-dir", str(data / f"s{i}"),
                listen=f"127.0.0.1:{lead}{i}{tail}", env={"HOSTNAME": f"hetkv-{i}"},
            ))
        return daemons

    lead, tail = random.randint(2, 5), random.randint(100, 999)
    pattern = f"127.0.0.1:{lead}{{i}}{tail}"
    three = statefulset(3, lead, tail, tmp_path)
    try:
        cluster = hetkv.connect(pattern, shards=3)
        table = cluster.create_table("grown", rows=5_000, dim=4,
                                     init=hetkv.Initializer.normal(std=0.1, seed=7),
                                     optimizer=hetkv.Optimizer.adagrad(lr=0.1))
        cache = table.cached(capacity=0.1)
        rng = np.random.default_rng(3)
        for _ in range(50):
            keys = rng.integers(0, 5_000, size=256).astype(np.uint64)
            cache.lookup(keys)
            cache.update(keys, rng.normal(size=(256, 4)).astype(np.float32))
        cache.flush()
        keys = np.arange(5_000, dtype=np.uint64)
        versions = np.zeros(5_000, dtype=np.uint64)
        want = table.pull(keys, versions=versions)
        want_versions = versions.copy()
        assert want_versions.sum() > 0
        cluster.checkpoint("grow")
        del cache, table, cluster
    finally:
        for d in three:
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(timeout=30)
    moved = subprocess.run(
        [str(hetkv_binary()), "checkpoint", "reshard",
         "--from", ",".join(str(tmp_path / f"s{i}") for i in range(3)), "--name", "grow",
         "--to", ",".join(str(tmp_path / f"t{i}") for i in range(4)), "--out", "grow-4"],
        capture_output=True, text=True, timeout=120,
    )
    assert moved.returncode == 0, moved.stderr
    lead4, tail4 = (lead % 5) + 2, (tail + 1) % 900 + 100
    four = []
    try:
        for i in range(4):
            four.append(Daemon(
                "--identity", "statefulset", "--shards", "4", "--data-dir", str(tmp_path / f"t{i}"),
                listen=f"127.0.0.1:{lead4}{i}{tail4}", env={"HOSTNAME": f"hetkv-{i}"},
            ))
        cluster = hetkv.connect(f"127.0.0.1:{lead4}{{i}}{tail4}", shards=4)
        got_versions = np.zeros(5_000, dtype=np.uint64)
        got = cluster.table("grown").pull(keys, versions=got_versions)
        assert np.array_equal(got, want)
        assert np.array_equal(got_versions, want_versions)
    finally:
        for d in four:
            d.close()
