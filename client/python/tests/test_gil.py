"""The GIL is released during every network call: while one thread waits on a stalled shard,
another Python thread keeps running."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import hetkv


def count_while(f):
    """Runs ``f`` in a thread while this one counts; returns (count, f's exception or None)."""
    result = {}

    def run():
        try:
            f()
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - handed back to the test
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    count = 0
    while t.is_alive():
        count += 1
    t.join()
    return count, result["error"]


def test_a_lookup_waiting_on_a_stopped_shard_lets_other_threads_run(daemon_factory):
    d = daemon_factory()
    cluster = hetkv.connect([d.addr], timeout=1.5)
    table = cluster.create_table("t", rows=100, dim=4)
    cache = table.cached(capacity=10, pull_bound=0)
    keys = np.arange(20, dtype=np.uint64)
    cache.lookup(keys)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        count, error = count_while(lambda: cache.lookup(keys))
        waited = time.monotonic() - started
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert isinstance(error, hetkv.ConnectionError), error
    assert 1.0 < waited < 10, waited
    # A thread holding the GIL for 1.5 s would leave this loop a handful of iterations.
    assert count > 100_000, f"the other thread ran only {count} iterations in {waited:.1f} s"
    cache.lookup(keys)  # the shard is back


def test_connecting_to_a_silent_address_lets_other_threads_run():
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    addr = "127.0.0.1:%d" % silent.getsockname()[1]
    count, error = count_while(lambda: hetkv.connect([addr], timeout=1.0))
    silent.close()
    assert isinstance(error, hetkv.ConnectionError), error
    assert count > 100_000, count
