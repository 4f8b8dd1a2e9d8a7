"""examples/python/deepfm.py runs end to end on a small Criteo-like data set, through hetkv with
a cache, without one, with torch.nn.Embedding, and on raw 64-bit ids in a dynamic table, and learns
(well above chance); it and examples/python/torchrun_train.py run under torchrun against running
daemons."""

import importlib.util
import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO, bench_binary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("criteo")
    subprocess.run(
        [str(bench_binary()), "criteo", "--samples", "30000", "--tsv", str(d / "c.tsv"), "--json", str(d / "c.json")],
        check=True,
        capture_output=True,
    )
    return d


def example():
    spec = importlib.util.spec_from_file_location("deepfm", REPO / "examples" / "python" / "deepfm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra",
    [
        ["--cache", "0.1", "--bound", "100"],
        ["--cache", "0", "--bound", "0"],
        ["--torch-embedding"],
        ["--cache", "0.1", "--bound", "100", "--raw-ids"],
    ],
    ids=["cached", "no-cache", "torch-embedding", "raw-ids"],
)
def test_the_deepfm_example_learns(data, extra):
    out = example().main(
        ["--tsv", str(data / "c.tsv"), "--report", str(data / "c.json"), "--hidden", "32,32", *extra]
    )
    assert out["samples"] == 27000
    assert 0.65 < out["test_auc"] <= out["planted_auc"] + 0.03, out


def torchrun(script: str, *args: str) -> None:
    """Runs ``examples/python/SCRIPT`` with two ranks under torchrun on this host (a free port
    for the rendezvous); fails with its output when it fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(REPO / "examples" / "python" / script), *args,
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_torchrun_ranks_train_against_the_same_running_shards(daemon_factory, tmp_path):
    """The torchrun recipe: two daemons started once, two ranks under torchrun connecting to
    both; every rank's updates land on the shards once, DDP keeps the dense part in sync, and the
    planted model is learnt."""
    shards = [daemon_factory("--shard", str(i), "--shards", "2") for i in range(2)]
    out = tmp_path / "result.json"
    torchrun("torchrun_train.py", "--servers", ",".join(d.addr for d in shards), "--steps", "150",
             "--out", str(out))
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["heads_in_sync"], r
    assert r["versions_sum"] == sum(r["updates_per_rank"]), "every rank's update applied once"
    assert r["last_loss"] < 0.5 * r["first_loss"], r


def test_the_deepfm_example_trains_under_torchrun_against_running_shards(data, daemon_factory, tmp_path):
    """HET's topology in small: two ranks, each a cache of its own, the dense part in DDP, both
    reading and pushing through the same daemons; the report counts every rank's samples and
    bytes, and the model learns."""
    shards = [daemon_factory("--shard", str(i), "--shards", "2") for i in range(2)]
    out = tmp_path / "deepfm.json"
    torchrun("deepfm.py", "--tsv", str(data / "c.tsv"), "--report", str(data / "c.json"),
             "--hidden", "32,32", "--cluster", ",".join(d.addr for d in shards), "--transport", "tcp",
             "--json", str(out))
    r = json.loads(out.read_text())
    # 27,000 training samples in whole steps of two ranks' batches of 128.
    assert r["world"] == 2 and r["samples"] == 27000 // 256 * 256, r
    assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    assert 0.65 < r["test_auc"] <= r["planted_auc"] + 0.03, r
