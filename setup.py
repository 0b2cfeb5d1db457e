"""Build the Cython fast path, or fall back to the pure-Python twin.

The twin (``kproxy/_fastpath_py.py``) has the same API, so a host without a
compiler still gets a working kproxy: ``pip install .`` then succeeds and says
so.  CI sets ``KPROXY_REQUIRE_EXTENSIONS=1`` so a broken build cannot hide
behind the fallback.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("KPROXY_REQUIRE_EXTENSIONS") == "1"
SKIP = os.environ.get("KPROXY_NO_EXTENSIONS") == "1" and not REQUIRE


class OptionalBuildExt(build_ext):
    """build_ext that degrades to the twin unless extensions are required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure means "use the twin"
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    def _fallback(self, exc: BaseException) -> None:
        if REQUIRE:
            raise
        msg = (
            "\n*** kproxy: compiling kproxy/_fastpath.pyx failed "
            f"({type(exc).__name__}: {exc});\n"
            "*** installing the pure-Python twin kproxy/_fastpath_py.py instead.\n"
        )
        sys.stderr.write(msg)
        print(msg)


def extensions() -> list[Extension]:
    if SKIP:
        print("kproxy: KPROXY_NO_EXTENSIONS=1, not compiling the fast path")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print("kproxy: Cython is not available; installing the pure-Python twin")
        return []
    ext = Extension(
        "kproxy._fastpath",
        ["kproxy/_fastpath.pyx"],
        extra_compile_args=["-O3"],
        # The NFQUEUE loop (_fastpath_nfq.pxi). Without libnetfilter-queue-dev the
        # compile or the link fails, which takes the twin path below like any
        # other build failure (or fails loudly under KPROXY_REQUIRE_EXTENSIONS=1).
        libraries=["netfilter_queue"],
    )
    return list(
        cythonize(
            [ext],
            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        )
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
