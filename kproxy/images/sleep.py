"""``kproxy/sleep``: sleep ``SECONDS`` (default forever); SIGTERM ends it with status 0."""

from __future__ import annotations

import signal
import sys
import threading


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv and argv[0] not in ("infinity", "inf") else None
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
