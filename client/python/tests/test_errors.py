"""Every error type, raised where it should be, carrying the Rust message; and arrays of the
wrong type or layout refused with TypeError or ValueError before anything is sent."""

import socket

import numpy as np
import pytest

import hetkv


@pytest.fixture
def cluster():
    with hetkv.EmbeddedCluster(shards=2) as c:
        yield c


def u64(*keys):
    return np.array(keys, dtype=np.uint64)


def test_error_classes_share_the_base():
    for name in [
        "ConnectionError",
        "UnknownTableError",
        "KeyOutOfRangeError",
        "WrongDimError",
        "InvalidGradientError",
        "CheckpointError",
        "TableConflictError",
        "ProtocolError",
        "RemoteError",
    ]:
        assert issubclass(getattr(hetkv, name), hetkv.Error), name


def test_unknown_table(cluster):
    with pytest.raises(hetkv.UnknownTableError, match="nope"):
        cluster.table("nope")


def test_key_out_of_range(cluster):
    t = cluster.create_table("t", rows=10, dim=2)
    with pytest.raises(hetkv.KeyOutOfRangeError, match="key 10 is outside table t of 10 rows"):
        t.pull(u64(10))
    with pytest.raises(hetkv.KeyOutOfRangeError):
        t.cached().lookup(u64(3, 99))


def test_wrong_dim(cluster):
    t = cluster.create_table("t", rows=10, dim=2)
    with pytest.raises(hetkv.WrongDimError, match="dim 2"):
        t.push(u64(1, 2), np.ones((2, 3), dtype=np.float32))
    with pytest.raises(hetkv.WrongDimError):
        t.cached().update(u64(1), np.ones((2, 2), dtype=np.float32))
    with pytest.raises(hetkv.WrongDimError):
        t.pull(u64(1), out=np.zeros((1, 5), dtype=np.float32))


def test_nan_gradients_change_nothing(cluster):
    t = cluster.create_table("t", rows=10, dim=2)
    bad = np.array([[0.5, np.nan]], dtype=np.float32)
    with pytest.raises(hetkv.InvalidGradientError):
        t.cached().update(u64(1), bad)
    with pytest.raises(hetkv.InvalidGradientError):
        t.push(u64(1), bad)  # refused by the shard itself
    versions = np.zeros(1, dtype=np.uint64)
    np.testing.assert_array_equal(t.pull(u64(1), versions=versions), [[0, 0]])
    assert versions[0] == 0


def test_checkpoint_without_a_data_dir(cluster):
    with pytest.raises(hetkv.CheckpointError, match="data"):
        cluster.checkpoint("c")


def test_conflicting_table(cluster):
    cluster.create_table("t", rows=10, dim=2)
    cluster.create_table("t", rows=10, dim=2)  # identical: fine
    with pytest.raises(hetkv.TableConflictError):
        cluster.create_table("t", rows=10, dim=3)
    with pytest.raises(hetkv.TableConflictError):
        cluster.create_table("bad name!", rows=10, dim=3)


def test_shards_listed_out_of_order(cluster):
    with pytest.raises(hetkv.ProtocolError, match="listed as shard 0"):
        hetkv.connect(list(reversed(cluster.addrs)))


def test_unreachable_and_silent_shards():
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % dead.getsockname()[1]
    dead.close()
    with pytest.raises(hetkv.ConnectionError, match=addr):
        hetkv.connect([addr], timeout=0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    with pytest.raises(hetkv.ConnectionError):
        hetkv.connect(["127.0.0.1:%d" % silent.getsockname()[1]], timeout=0.5)
    silent.close()


def test_a_wrong_token_is_refused(daemon_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("right token\n")
    d = daemon_factory("--auth-token-file", str(token))
    with pytest.raises(hetkv.RemoteError, match="Unauthorized"):
        hetkv.connect([d.addr], auth_token="wrong token", timeout=2)
    hetkv.connect([d.addr], auth_token="right token")


def test_arrays_of_the_wrong_type_or_layout(cluster):
    t = cluster.create_table("t", rows=10, dim=2)
    # int64 keys (torch's dtype) are their u64 bit patterns: the same rows as uint64 ...
    np.testing.assert_array_equal(t.pull(np.array([1, 2], dtype=np.int64)), t.pull(u64(1, 2)))
    # ... so a negative one is a key far outside a fixed table, named as such.
    with pytest.raises(hetkv.KeyOutOfRangeError, match=str(2**64 - 1)):
        t.pull(np.array([-1], dtype=np.int64))
    with pytest.raises(TypeError, match="uint64 or int64"):
        t.pull(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="uint64"):
        t.pull([1, 2])
    with pytest.raises(TypeError, match="1-D"):
        t.pull(np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="C-contiguous"):
        t.pull(np.arange(8, dtype=np.uint64)[::2])
    with pytest.raises(TypeError, match="float32"):
        t.push(u64(1), np.ones((1, 2), dtype=np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        t.push(u64(1, 2), np.ones((2, 4), dtype=np.float32)[:, ::2])
    with pytest.raises(TypeError, match="float32"):
        t.pull(u64(1), out=np.zeros((1, 2), dtype=np.float64))
    with pytest.raises(ValueError, match="transport"):
        hetkv.connect(cluster.addrs, transport="carrier-pigeon")
    with pytest.raises(ValueError, match="fraction"):
        t.cached(capacity=1.5)
    with pytest.raises(ValueError):
        t.cached(policy="random")
