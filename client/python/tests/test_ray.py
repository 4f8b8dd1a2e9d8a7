"""``hetkv.ray``: shards as Ray actors on a local Ray cluster. A shard actor killed as a crash
would is restarted by Ray on the same address, restores its newest checkpoint, and its clients
see a restart that took back exactly the acknowledged pushes after that checkpoint; a Ray Train
``TorchTrainer`` training through three shard actors, one killed mid-run, is told of the
rollback, resumes from the job's checkpoint (the tables' rows and optimizer state set on the
running shards) and ends within 0.002 AUC of the same run undisturbed."""

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


def test_ray_train_resumes_a_run_whose_shard_actor_was_killed_and_ends_where_an_undisturbed_one_does():
    import json
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parents[3] / "examples" / "python" / "ray_train.py"

    def run(*kill):
        out = subprocess.run(
            # Bounds 0: the two runs differ only by the order the workers' pushes interleave in.
            [sys.executable, str(example), "--shards", "3", "--workers", "2", "--steps", "200",
             "--bound", "0", "--checkpoint-every", "50", *kill],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    undisturbed = run()
    assert undisturbed["resumed_from"] is None
    assert undisturbed["last_loss"] < undisturbed["first_loss"], undisturbed
    assert undisturbed["test_auc"] > 0.7, undisturbed
    killed = run("--kill-shard-at", "80")
    # Told of the rollback at step 81, the workers were started again from the job's
    # checkpoint of step 50.
    assert killed["resumed_from"] == 50, killed
    assert abs(killed["test_auc"] - undisturbed["test_auc"]) < 0.002, (killed, undisturbed)
