"""``hetkv.ray``: shards as Ray actors on a local Ray cluster. A shard actor killed as a crash
would is restarted by Ray on the same address, restores its newest checkpoint, and its clients
see a restart that took back exactly the acknowledged pushes after that checkpoint; a Ray Train
``TorchTrainer`` trains through three shard actors while one is killed mid-run, told of what
the restart took back."""

import os

import numpy as np
import pytest
import ray

import hetkv
import hetkv.ray


# No usage report from the tests' Ray instances (the tests' machines reach no such server).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_killed_shard_actor_comes_back_with_its_checkpoint(local_ray, tmp_path):
    shards = hetkv.ray.start_shards(2, str(tmp_path))
    try:
        cluster = shards.connect(timeout=60)
        cluster.set_on_rollback("continue")
        table = cluster.create_table("t", rows=100, dim=2, init=hetkv.Initializer.zeros(),
                                     optimizer=hetkv.Optimizer.sgd(lr=1.0))
        keys = np.arange(100, dtype=np.uint64)
        grads = np.ones((100, 2), dtype=np.float32)
        table.push(keys, grads)
        table.push(keys, grads)
        cluster.checkpoint("c1")
        table.push(keys, grads)  # acknowledged, not in the checkpoint
        before = ray.get(shards.actors[1].pid.remote())
        shards.kill(1)
        shards.wait_ready()
        assert ray.get(shards.actors[1].pid.remote()) != before, "a new process"
        versions = np.zeros(100, dtype=np.uint64)
        table.pull(keys, versions=versions)
        on_one = int((versions == 2).sum())
        assert on_one > 0 and on_one + int((versions == 3).sum()) == 100, versions
        r = cluster.restarts()
        assert (r["seen"], r["pushes_rolled_back"], r["rows_rolled_back"]) == (1, 1, on_one)
        table.push(keys, grads)  # the cluster goes on
        table.pull(keys, versions=versions)
        assert int((versions == 3).sum()) == on_one
    finally:
        shards.shutdown()


def test_ray_train_trains_through_a_shard_actor_killed_mid_run():
    import json
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parents[3] / "examples" / "python" / "ray_train.py"
    out = subprocess.run(
        [sys.executable, str(example), "--shards", "3", "--workers", "2", "--steps", "200",
         "--kill-shard-at", "80"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["restarts_seen"] == 1, result
    assert result["pushes_rolled_back"] > 0, "the pushes after the last checkpoint were taken back"
    assert result["last_loss"] < result["first_loss"] / 10, result
