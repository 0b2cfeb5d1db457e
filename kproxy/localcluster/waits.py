"""Bounded polling: :func:`wait_for` is the only way the local cluster waits on state.

Invariant: every wait has a deadline; exceptions from the probe count as "not yet"
(an apiserver that is still starting refuses connections), except
:class:`~kproxy.localcluster.errors.ComponentExited`, which ends the wait at once —
a dead component will not come up by waiting longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from kproxy.localcluster.errors import ComponentExited, WaitTimeout

__all__ = ["wait_for"]

T = TypeVar("T")


def wait_for(
    what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2
) -> T:
    """Poll ``fn`` until it returns something truthy, and return that; raise
    :class:`WaitTimeout` (naming ``what`` and the last result or error) after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except ComponentExited:
            raise
        except Exception as exc:  # keep polling; the last failure goes in the report
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]  # fn's truthy result, a T
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
