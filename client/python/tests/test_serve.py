"""The daemon from pip: the wheel's ``hetkv`` console script and ``python -m hetkv`` run
``hetkv serve`` (the binary's flags, one home), in this venv and in a fresh one that has only the
wheel; a client connects, trains a row, and SIGTERM stops the daemon cleanly."""

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

import hetkv
from conftest import Daemon


def train_against(daemon: Daemon) -> None:
    cluster = hetkv.connect([daemon.addr])
    table = cluster.create_table("served", rows=10, dim=2, optimizer=hetkv.Optimizer.sgd(lr=1.0))
    keys = np.array([3], dtype=np.uint64)
    table.push(keys, np.ones((1, 2), dtype=np.float32))
    assert table.pull(keys).tolist() == [[-1.0, -1.0]]
    del cluster


def stop(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, "".join(daemon.log)


def test_python_m_hetkv_serves_a_shard_and_stops_on_sigterm():
    daemon = Daemon(command=[sys.executable, "-m", "hetkv"])
    try:
        train_against(daemon)
        stop(daemon)
    finally:
        daemon.close()


def test_the_wheel_s_hetkv_serve_runs_in_a_fresh_venv(tmp_path):
    wheel = os.environ.get("HETKV_WHEEL")
    if not wheel:
        pytest.fail("set HETKV_WHEEL to the wheel to install (scripts/test.sh builds it)")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
         "--no-deps", wheel],
        check=True,
    )
    script = venv / "bin" / "hetkv"
    help = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True)
    assert help.returncode == 0 and "--listen" in help.stdout, help.stderr
    bad = subprocess.run([str(script), "serve", "--shards", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip(), "a bad flag is a clear error"
    daemon = Daemon(command=[str(script)])
    try:
        train_against(daemon)
        stop(daemon)
    finally:
        daemon.close()
