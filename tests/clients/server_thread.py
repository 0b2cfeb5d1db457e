"""A real apiserver on 127.0.0.1 (OS-chosen port) in a background thread, for the
synchronous official clients (the ``kubernetes`` package, ``kubectl``).

:class:`ThreadedApiServer` owns its event loop, store and server; :meth:`call` runs a
coroutine on that loop (to compact the store, read state); :meth:`stop` ends it all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from kproxy.apiserver.server import ApiServer, ServerConfig
from kproxy.store import MemoryStore, SqliteStore, Store

T = TypeVar("T")


class ThreadedApiServer:
    def __init__(self, data_dir: Path, backend: str = "memory") -> None:
        self.data_dir = data_dir
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.store: Store | None = None
        self.server: ApiServer | None = None

    def start(self) -> ThreadedApiServer:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        if self.backend == "sqlite":
            self.store = await SqliteStore.open(self.data_dir / "kproxy.db")
        else:
            self.store = MemoryStore()
        self.server = ApiServer(
            self.store,
            ServerConfig(
                secure_port=0, data_dir=self.data_dir, compaction_interval=0, bookmark_interval=1.0
            ),
        )
        await self.server.start()

    @property
    def kubeconfig(self) -> Path:
        assert self.server is not None and self.server.pki is not None
        return self.server.pki.admin_kubeconfig

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def compact(self) -> int:
        async def compact() -> int:
            assert self.store is not None
            rev = await self.store.current_revision()
            await self.store.compact(rev)
            return rev

        return self.call(compact())

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                await self.store.close()

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
