"""Image names → built-in programs, and argv assembly per the Pod API."""

from __future__ import annotations

import sys

import pytest

from kproxy.kubelet.images import (
    ERR_IMAGE_PULL,
    INVALID_IMAGE,
    ImageError,
    container_argv,
    normalise,
    resolve,
)


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("kproxy/echo", "kproxy/echo"),
        ("kproxy/echo:latest", "kproxy/echo"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("busybox@sha256:" + "a" * 64, "busybox"),
        ("localhost:5000/kproxy/sleep:v1", "kproxy/sleep"),
    ],
)
def test_normalise(image: str, name: str) -> None:
    assert normalise(image) == name


@pytest.mark.parametrize("image", ["", "Bad/Name", "two words", " kproxy/echo"])
def test_invalid_names(image: str) -> None:
    with pytest.raises(ImageError) as err:
        resolve(image)
    assert err.value.reason == INVALID_IMAGE


def test_unknown_image_is_a_pull_error() -> None:
    with pytest.raises(ImageError) as err:
        resolve("nginx:1.25")
    assert err.value.reason == ERR_IMAGE_PULL
    assert "kproxy/echo" in str(err.value)


def test_argv_rules() -> None:
    echo = resolve("kproxy/echo")
    assert container_argv(echo, [], []) == [sys.executable, "-m", "kproxy.images.echo"]
    assert container_argv(echo, [], ["--tcp-port", "0"])[-2:] == ["--tcp-port", "0"]
    shell = resolve("busybox")
    assert container_argv(shell, [], []) == ["/bin/sh"]
    assert container_argv(shell, [], ["-c", "true"]) == ["-c", "true"]  # args replace Cmd
    assert container_argv(shell, ["sleep"], ["5"]) == ["sleep", "5"]
