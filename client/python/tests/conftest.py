"""Shared fixtures: the ``hetkv`` binary (for daemons in processes of their own and the export
command), and daemons started from it."""

import os
import pathlib
import re
import subprocess
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def hetkv_binary() -> pathlib.Path:
    """``$HETKV_BIN``, else the workspace's debug build (``cargo build -p hetkv-store``)."""
    path = pathlib.Path(os.environ.get("HETKV_BIN", REPO / "target" / "debug" / "hetkv"))
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `cargo build -p hetkv-store` or set HETKV_BIN")
    return path


def bench_binary() -> pathlib.Path:
    """``$HETKV_BENCH_BIN``, else the workspace's debug build of ``hetkv-bench``."""
    path = pathlib.Path(os.environ.get("HETKV_BENCH_BIN", REPO / "target" / "debug" / "hetkv-bench"))
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `cargo build -p hetkv-bench` or set HETKV_BENCH_BIN")
    return path


class Daemon:
    """A ``hetkv serve`` process on loopback (the workspace's binary, or ``command``: the wheel's
    console script, say); killed when closed."""

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", command=None, env=None):
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1", **(env or {}))
        command = [str(hetkv_binary())] if command is None else list(command)
        self.proc = subprocess.Popen(
            [*command, "serve", "--listen", listen, *args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log = []
        self.addr = None
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"listening addr=(\S+)", line)
            if m:
                self.addr = m.group(1)
                break
        if self.addr is None:
            raise RuntimeError("hetkv serve did not start:\n" + "".join(self.log))
        # Keep draining its log, so that its writes never block.
        threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr], daemon=True).start()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def daemon_factory():
    started = []

    def start(*args: str, **kw) -> Daemon:
        d = Daemon(*args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
