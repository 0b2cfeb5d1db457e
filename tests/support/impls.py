"""The fast path's two implementations, for tests that run a case against both.

``COMPILED`` is the built extension (``kproxy._fastpath``) or None when it is not
built (an error under ``KPROXY_REQUIRE_EXTENSIONS=1``, as in CI); ``IMPLS`` are the
``impl`` parameters (the twin, then the compiled module when there is one);
``needs_compiled`` skips a case that only makes sense with the extension.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from kproxy import _fastpath_py

__all__ = ["COMPILED", "IMPLS", "needs_compiled"]


def _compiled() -> ModuleType | None:
    try:
        return importlib.import_module("kproxy._fastpath")
    except ImportError:
        if os.environ.get("KPROXY_REQUIRE_EXTENSIONS") == "1":
            raise
        return None


COMPILED = _compiled()
IMPLS = [pytest.param(_fastpath_py, id="twin")]
if COMPILED is not None:
    IMPLS.append(pytest.param(COMPILED, id="compiled"))
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="extension not built")
