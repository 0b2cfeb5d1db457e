"""Image names → what to execute: kproxy's built-in "images" (no registry, no layers).

Owns :func:`resolve` and :func:`container_argv`. A built-in image is an entrypoint and
a default command, as an OCI image config's ``Entrypoint``/``Cmd``:

- ``kproxy/echo``, ``kproxy/udp-echo``, ``kproxy/sleep`` → ``python -m kproxy.images.*``
  with the kubelet's own interpreter;
- ``kproxy/shell`` and ``busybox`` → the host's ``/bin/sh`` (no entrypoint, ``Cmd`` ``sh``),
  so ``command: [sleep, "3600"]`` or ``args: ["-c", "..."]`` work as with busybox.

Names are normalised as a registry would: an optional registry host
(``docker.io/library/``) and tag or digest are dropped. A name that is not a valid
reference is :data:`INVALID_IMAGE`; a valid one that is not built in is
:data:`ERR_IMAGE_PULL` — the container then waits with that reason, as a kubelet that
cannot pull.

Argv assembly follows the Pod API: ``command`` replaces the entrypoint and drops the
default command; ``args`` replaces the default command.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.errors import KProxyError

INVALID_IMAGE = "InvalidImageName"
ERR_IMAGE_PULL = "ErrImagePull"
IMAGE_PULL_BACKOFF = "ImagePullBackOff"

_REFERENCE = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


class ImageError(KProxyError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Image:
    name: str  # normalised
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]


def _module(mod: str) -> tuple[str, ...]:
    return (sys.executable, "-m", f"kproxy.images.{mod}")


BUILTIN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kproxy/echo": (_module("echo"), ()),
    "kproxy/udp-echo": (_module("udp_echo"), ()),
    "kproxy/sleep": (_module("sleep"), ()),
    "kproxy/shell": ((), ("/bin/sh",)),
    "busybox": ((), ("/bin/sh",)),
}


def normalise(image: str) -> str:
    """``docker.io/library/busybox:1.36`` → ``busybox``; raise for invalid references."""
    if not image or image != image.strip() or not _REFERENCE.match(image):
        raise ImageError(INVALID_IMAGE, f'Failed to apply default image tag "{image}": '
                         "couldn't parse image name")  # fmt: skip
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rfind(":")]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


def resolve(image: str) -> Image:
    name = normalise(image)
    if name not in BUILTIN:
        known = ", ".join(sorted(BUILTIN))
        raise ImageError(
            ERR_IMAGE_PULL,
            f'failed to pull image "{image}": not a kproxy built-in image (known: {known})',
        )
    entrypoint, cmd = BUILTIN[name]
    return Image(name, entrypoint, cmd)


def container_argv(image: Image, command: Sequence[str], args: Sequence[str]) -> list[str]:
    argv = [*command, *args] if command else [*image.entrypoint, *(args or image.cmd)]
    if not argv:
        raise ImageError("CreateContainerError", f"no command specified for {image.name}")
    return argv
