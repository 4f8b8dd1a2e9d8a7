"""What a Python trainer is told: arrays in another layout are refused (never read in the wrong
order), an address where nothing listens fails at once, a closed cluster fails at once, ``stats``,
``bounds`` and ``repr`` answer while another thread's call waits on a stopped shard, a restart that
took back acknowledged pushes raises (once), a cache dropped with unpushed updates says so, and
the Rust side's logs reach ``logging``."""

import gc
import logging
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import hetkv


def stop(pid: int) -> None:
    """SIGSTOP, returning once the process is stopped (the signal is asynchronous: a request sent
    right after ``kill`` returns can still be answered)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_a_fortran_ordered_array_is_refused_everywhere_it_could_be_misread():
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = cluster.create_table("t", rows=10, dim=3, optimizer=hetkv.Optimizer.sgd(1.0))
        cache = table.cached(capacity=10, pull_bound=0, push_bound=0)
        keys = np.array([1, 2], dtype=np.uint64)
        grads = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        assert grads.flags.f_contiguous and not grads.flags.c_contiguous
        for call in [
            lambda: table.push(keys, grads),
            lambda: cache.update(keys, grads),
            lambda: table.assign(keys, grads),
            lambda: table.pull(keys, out=np.asfortranarray(np.zeros((2, 3), dtype=np.float32))),
            lambda: cache.lookup(keys, out=np.asfortranarray(np.zeros((2, 3), dtype=np.float32))),
        ]:
            with pytest.raises(ValueError, match="C-contiguous"):
                call()
        np.testing.assert_array_equal(table.pull(keys), np.zeros((2, 3)), "nothing was applied")
        # The same values in C order are taken row by row.
        table.push(keys, np.ascontiguousarray(grads))
        np.testing.assert_array_equal(table.pull(keys), -np.arange(6, dtype=np.float32).reshape(2, 3))


def test_an_address_where_nothing_listens_fails_at_once():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    started = time.monotonic()
    with pytest.raises(hetkv.ConnectionError, match="connection refused"):
        hetkv.connect([f"127.0.0.1:{port}"])
    assert time.monotonic() - started < 1.0


def test_a_closed_cluster_fails_at_once():
    cluster = hetkv.EmbeddedCluster(shards=2)
    table = cluster.create_table("t", rows=10, dim=2, optimizer=hetkv.Optimizer.sgd(1.0))
    cache = table.cached(capacity=4)
    keys = np.array([1], dtype=np.uint64)
    cache.lookup(keys)
    cluster.close()
    started = time.monotonic()
    for call in [
        lambda: cache.lookup(keys),
        lambda: cache.flush(),
        lambda: table.pull(keys),
        lambda: cluster.table("t"),
    ]:
        with pytest.raises(hetkv.ConnectionError, match="closed"):
            call()
    assert time.monotonic() - started < 1.0


def test_stats_bounds_and_repr_answer_while_another_thread_waits_on_a_stopped_shard(daemon_factory):
    d = daemon_factory()
    cluster = hetkv.connect([d.addr], timeout=3)
    table = cluster.create_table("t", rows=100, dim=4, optimizer=hetkv.Optimizer.sgd(0.1))
    cache = table.cached(capacity=10, pull_bound=0, push_bound=0)
    keys = np.arange(20, dtype=np.uint64)
    cache.lookup(keys)
    stop(d.proc.pid)
    try:
        outcome = {}

        def look_up():
            try:
                cache.lookup(keys)
                outcome["done"] = True
            except hetkv.ConnectionError as e:
                outcome["done"] = e

        t = threading.Thread(target=look_up)
        t.start()
        time.sleep(0.3)
        assert t.is_alive(), "the lookup waits on the stopped shard"
        started = time.monotonic()
        stats = cache.stats()
        bounds = cache.bounds
        text = repr(cache)
        answered = time.monotonic() - started
        assert t.is_alive()
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    t.join()
    assert "done" in outcome, "the lookup ended, one way or the other, once the shard was back"
    assert answered < 0.5, answered
    assert stats["lookups"] == 20 and bounds == (0, 0) and "resident=10" in text


def test_a_restart_that_took_back_acknowledged_pushes_raises_once(daemon_factory, tmp_path):
    data = tmp_path / "data"
    d = daemon_factory("--data-dir", str(data))
    cluster = hetkv.connect([d.addr])
    table = cluster.create_table("t", rows=10, dim=2, optimizer=hetkv.Optimizer.sgd(1.0))
    cache = table.cached(capacity=4, pull_bound=0, push_bound=0)
    keys, ones = np.array([1], dtype=np.uint64), np.ones((1, 2), dtype=np.float32)
    cache.update(keys, ones)
    cluster.checkpoint("before")
    for _ in range(3):
        cache.update(keys, ones)
    d.close()  # SIGKILL
    daemon_factory("--data-dir", str(data), listen=d.addr)
    with pytest.raises(hetkv.RollbackError, match="lacks 3 pushes"):
        cache.lookup(keys)
    np.testing.assert_array_equal(cache.lookup(keys), [[-1.0, -1.0]], "the restored row")
    assert cluster.restarts()["pushes_rolled_back"] == 3


def test_a_cache_dropped_with_unpushed_updates_says_so_through_logging(caplog):
    with hetkv.EmbeddedCluster(shards=1) as cluster:
        table = cluster.create_table("t", rows=10, dim=2, optimizer=hetkv.Optimizer.sgd(1.0))
        cache = table.cached(capacity=4, pull_bound=0, push_bound=None)
        keys = np.array([1, 2], dtype=np.uint64)
        cache.lookup(keys)
        cache.update(keys, np.ones((2, 2), dtype=np.float32))
        with caplog.at_level(logging.WARNING):
            del cache
            gc.collect()
        assert "dropped with updates the shards never got" in caplog.text
        assert any(r.name.startswith("hetkv_client") for r in caplog.records), [
            r.name for r in caplog.records
        ]


def test_a_forked_child_pushes_under_a_stream_of_its_own(daemon_factory):
    """``connect`` then ``os.fork()``: parent and child number their pushes apart, so neither's
    push is taken for a repeat of the other's and dropped. Both push 99 times to one key; the
    row's version is 198."""
    d = daemon_factory()
    cluster = hetkv.connect([d.addr])
    table = cluster.create_table("t", rows=4, dim=2, optimizer=hetkv.Optimizer.sgd(1.0))
    keys = np.array([1], dtype=np.uint64)
    ones = np.ones((1, 2), dtype=np.float32)
    table.push(keys, ones)  # a connection is pooled before the fork
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for _ in range(99):
                table.push(keys, ones)
            code = 0
        finally:
            os._exit(code)
    for _ in range(99):
        table.push(keys, ones)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's pushes failed"
    versions = np.zeros(1, dtype=np.uint64)
    table.pull(keys, versions=versions)
    assert versions[0] == 1 + 99 + 99, f"version {versions[0]}: pushes were taken for repeats"


@pytest.mark.parametrize("call", ["table.pull", "cache.lookup", "table.push"])
def test_ctrl_c_interrupts_a_call_waiting_on_a_stopped_daemon_within_a_second(daemon_factory, call):
    """SIGINT while the call waits on a SIGSTOPped daemon (timeout 60 s): KeyboardInterrupt within
    a second. A push interrupted after it was sent is held and delivered once by the next call."""
    d = daemon_factory()
    cluster = hetkv.connect([d.addr], timeout=60)
    table = cluster.create_table("t", rows=100, dim=4, optimizer=hetkv.Optimizer.sgd(1.0))
    cache = table.cached(capacity=10, pull_bound=0, push_bound=0)
    keys = np.arange(20, dtype=np.uint64)
    grads = np.ones((20, 4), dtype=np.float32)
    run = {
        "table.pull": lambda: table.pull(keys),
        "cache.lookup": lambda: cache.lookup(keys),
        "table.push": lambda: table.push(keys, grads),
    }[call]
    stop(d.proc.pid)
    try:
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run()
        waited = time.monotonic() - started
        timer.join()
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert waited < 0.5 + 1.0, f"{call} ended {waited:.2f} s after it started (SIGINT at 0.5 s)"
    # The daemon is back: calls work, and an interrupted push was applied exactly once.
    versions = np.zeros(20, dtype=np.uint64)
    table.pull(keys, versions=versions)
    cluster_pushes = 1 if call == "table.push" else 0
    assert (versions == cluster_pushes).all(), versions
