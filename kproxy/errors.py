"""The root of kproxy's exceptions.

Every error kproxy raises on purpose derives from :class:`KProxyError`, so a
caller can tell kproxy's own failures (which carry their input) from bugs.
"""

from __future__ import annotations


class KProxyError(Exception):
    """Root of all kproxy errors."""
