"""The in-process client: :class:`RestClient`'s surface, bound to an apiserver in the
same process.

For single-process setups (``kproxy`` running the apiserver, controllers, scheduler
and proxy together) the components keep using the client API they use against a
remote apiserver — informers, list/watch, patch, Status errors — with no TCP port,
TLS or token between them.

Design (chosen over the alternatives; DESIGN §2 calls it "an in-process client"):

- It speaks HTTP to the apiserver's own aiohttp application over a Unix socket the
  apiserver opens on request (``ApiServer.local_socket()``, in a private 0700
  directory). Every request therefore goes through the same middleware, handlers,
  validation, defaulting, admission and watch fan-out as a remote one; only the
  transport differs, and the whole of :class:`RestClient` (error mapping, watch line
  splitting, paging) is reused unchanged.
- Not a store-bound client: calling the registry directly would skip the handlers,
  which own body decoding, patch application, dryRun, DeleteOptions, selectors and
  watch framing; a second copy of that logic would drift from the REST surface.
- Not a mocked request object (aiohttp's ``make_mocked_request``): it is a test
  utility built on ``unittest.mock`` and cannot stream a watch.

Identity: the socket's requests are plain HTTP and act as the apiserver's insecure-port
admin (``system:masters``, like upstream's loopback client). Only code in the same
process (or with access to the private directory) can reach it.

This module must not import ``kproxy.apiserver`` (client and apiserver are sibling
layers): it takes anything with ``async local_socket() -> Path``; the composition root
passes the running ``ApiServer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import aiohttp

from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import USER_AGENT, RestClient

# The host part is ignored by the Unix connector; it shows up in errors and logs.
IN_PROCESS_SERVER = "http://in-process.apiserver"


class LocalApiServer(Protocol):
    """What the in-process client needs from an apiserver: its local socket."""

    async def local_socket(self) -> Path: ...


class InProcessClient(RestClient):
    """A :class:`RestClient` over the apiserver's local Unix socket.

    Build it with ``await InProcessClient.connect(server)``; close it when done (the
    apiserver's socket stays for other clients until the apiserver stops).
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        namespace: str = "default",
        user_agent: str = USER_AGENT,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            ClientConfig(server=IN_PROCESS_SERVER, namespace=namespace, context="in-process"),
            user_agent=user_agent,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
        )
        self.socket_path = socket_path

    @classmethod
    async def connect(
        cls,
        server: LocalApiServer,
        *,
        namespace: str = "default",
        user_agent: str = USER_AGENT,
        request_timeout: float = 30.0,
    ) -> InProcessClient:
        """A client of ``server`` (which must be running)."""
        return cls(
            await server.local_socket(),
            namespace=namespace,
            user_agent=user_agent,
            request_timeout=request_timeout,
        )

    def _sess(self) -> aiohttp.ClientSession:
        # As RestClient's, lazily (a session belongs to its loop), but over the socket.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket_path)),
                headers={"User-Agent": self._user_agent, "Accept": "application/json"},
            )
        return self._session


__all__ = ["IN_PROCESS_SERVER", "InProcessClient", "LocalApiServer"]
