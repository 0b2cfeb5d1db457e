"""kproxy: a kube-proxy in Python with a Cython fast path.

See DESIGN.md (shared) for the layout; ``kproxy.cli`` is the only composition
root.
"""

__version__ = "0.1.0"
