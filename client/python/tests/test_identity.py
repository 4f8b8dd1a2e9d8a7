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
