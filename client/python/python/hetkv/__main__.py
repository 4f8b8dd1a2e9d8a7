"""The ``hetkv`` command line from the wheel: ``hetkv serve`` runs one shard of a cluster in the
foreground until SIGTERM or SIGINT, and ``hetkv stats``, ``checkpoint``, ``export`` and
``import`` are the operator commands; the flags are the ``hetkv`` binary's (``hetkv --help``).
Installed as the ``hetkv`` console script, and run by ``python -m hetkv``."""

import signal
import sys


def main() -> int:
    # The daemon handles SIGINT and SIGTERM itself (a clean stop); Python's own SIGINT handler
    # would raise KeyboardInterrupt after it returned.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from ._hetkv import _run_cli

    return _run_cli(["hetkv", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
