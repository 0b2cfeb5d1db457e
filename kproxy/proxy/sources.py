"""Where the proxy's objects come from, reduced to one event interface.

The proxy core sees only :class:`Handler` calls: ``(old, new)`` pairs for
Services, EndpointSlices and the proxy's own Node (``old`` None on add, ``new``
None on delete), then ``synced()`` once the first full set has been delivered.
Sources:

- :class:`ObjectsFile` — ``--objects FILE``: Kubernetes YAML or JSON, multi-doc
  or a ``List``, re-read when the file changes.  A file that does not parse is
  logged and the previous objects stay in force (a typo must not wipe every
  rule); a document that is not a Service, EndpointSlice or Node is logged and
  skipped.
- the apiserver informers (``--kubeconfig``/``--master``), in
  :mod:`kproxy.proxy.apisource`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name

KINDS = ("Service", "EndpointSlice", "Node")


class SourceError(KProxyError):
    """An objects file that cannot be read or parsed."""


class Handler(Protocol):
    def on_service(self, old: Obj | None, new: Obj | None) -> None: ...
    def on_endpoint_slice(self, old: Obj | None, new: Obj | None) -> None: ...
    def on_node(self, old: Obj | None, new: Obj | None) -> None: ...
    def synced(self) -> None: ...


def parse_objects(text: str, origin: str = "<objects>") -> dict[Key, Obj]:
    """The Services, EndpointSlices and Nodes in ``text`` (YAML or JSON)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise SourceError(f"{origin}: not valid YAML/JSON: {exc}") from exc
    out: dict[Key, Obj] = {}
    for doc in _flatten(docs):
        if not isinstance(doc, Mapping):
            log.error("%s: skipping a document that is not an object: %.60r", origin, doc)
            continue
        kind = doc.get("kind")
        meta = doc.get("metadata")
        if kind not in KINDS:
            log.warning("%s: skipping kind %r (kproxy follows %s)", origin, kind, ", ".join(KINDS))
            continue
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            log.error("%s: skipping a %s without metadata.name", origin, kind)
            continue
        namespace = "" if kind == "Node" else str(meta.get("namespace") or "default")
        key = (str(kind), namespace, meta["name"])
        if key in out:
            log.warning("%s: %s %s/%s appears twice; the last one wins", origin, *key)
        out[key] = doc
    return out


def _flatten(docs: Iterable[Any]) -> Iterable[Any]:
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, Mapping) and str(doc.get("kind", "")).endswith("List"):
            yield from _flatten(doc.get("items") or [])
        else:
            yield doc


def dispatch(handler: Handler, old: Mapping[Key, Obj], new: Mapping[Key, Obj], node: str) -> int:
    """Deliver the difference between two object sets; returns the number of events."""
    events = 0
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        kind = key[0]
        if kind == "Service":
            handler.on_service(before, after)
        elif kind == "EndpointSlice":
            handler.on_endpoint_slice(before, after)
        elif kind == "Node":
            if key[2] != node:
                continue  # the proxy follows only its own Node
            handler.on_node(before, after)
        events += 1
    return events


class ObjectsFile:
    """``--objects FILE``, polled for changes (content hash, not just mtime)."""

    def __init__(self, path: str | Path, node_name: str, poll_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.node_name = node_name
        self.poll_interval = poll_interval
        self._objects: dict[Key, Obj] = {}
        self._digest = b""
        self.loads = 0

    def load(self) -> dict[Key, Obj] | None:
        """The file's objects if its content changed since the last load, else None."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read --objects {self.path}: {exc}") from exc
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        return parse_objects(raw.decode("utf-8", errors="replace"), str(self.path))

    def refresh(self, handler: Handler) -> int:
        """Re-read the file and deliver what changed; -1 when it could not be used."""
        try:
            objects = self.load()
        except SourceError as exc:
            log.error("%s; keeping the previous objects", exc)
            return -1
        if objects is None:
            return 0
        events = dispatch(handler, self._objects, objects, self.node_name)
        self._objects = objects
        self.loads += 1
        return events

    async def run(self, handler: Handler) -> None:
        """Deliver the file's objects, then follow its changes until cancelled."""
        while self.refresh(handler) < 0 and not self._objects:
            await asyncio.sleep(self.poll_interval)
        handler.synced()
        while True:
            await asyncio.sleep(self.poll_interval)
            self.refresh(handler)
