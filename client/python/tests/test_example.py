"""examples/python/deepfm.py runs end to end on a small Criteo-like data set, through hetkv with
a cache, without one, with torch.nn.Embedding, and on raw 64-bit ids in a dynamic table, and learns
(well above chance)."""

import importlib.util
import subprocess

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
