"""What the kubelet remembers across restarts, under ``<root-dir>/pods/<uid>/``.

Owns :class:`PodRecord` (``pod.json``: the pod's identity, its netns and host veth,
its IP, and per container the pid, the pid's start time, the restart count and the
start time) and :class:`StateDir` (load, save, list, remove; log paths).

Invariants: ``pod.json`` is replaced atomically (temp file + rename), and written
before the kubelet acts on what it records (a container's pid is saved right after the
spawn, before anything else can fail), so a kubelet killed at any point finds every
process and namespace it created; a record that cannot be parsed is logged and kept
aside (``pod.json.bad``), never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass
class ContainerRecord:
    pid: int
    ticks: int
    restart_count: int = 0
    started_at: str = ""


@dataclass
class PodRecord:
    uid: str
    namespace: str
    name: str
    netns: str
    host_if: str
    ip: str = ""  # "10.250.0.2/24" once allocated
    start_time: str = ""
    containers: dict[str, ContainerRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PodRecord:
        containers = {
            str(k): ContainerRecord(**v) for k, v in (raw.get("containers") or {}).items()
        }
        return cls(
            uid=str(raw["uid"]),
            namespace=str(raw["namespace"]),
            name=str(raw["name"]),
            netns=str(raw["netns"]),
            host_if=str(raw["host_if"]),
            ip=str(raw.get("ip") or ""),
            start_time=str(raw.get("start_time") or ""),
            containers=containers,
        )


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pods = root / "pods"
        self.pods.mkdir(parents=True, exist_ok=True)

    def pod_dir(self, uid: str) -> Path:
        if not _UID.match(uid):
            raise ValueError(f"not a pod uid: {uid!r}")
        return self.pods / uid

    def log_path(self, uid: str, container: str, restart: int) -> Path:
        return self.pod_dir(uid) / "logs" / container / f"{restart}.log"

    def save(self, record: PodRecord) -> None:
        d = self.pod_dir(record.uid)
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".pod.json.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / "pod.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_all(self) -> list[PodRecord]:
        out: list[PodRecord] = []
        for d in sorted(self.pods.iterdir()):
            path = d / "pod.json"
            if not path.is_file():
                continue
            try:
                out.append(PodRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("pod state %s unreadable (%s); moved to pod.json.bad", path, exc)
                os.replace(path, d / "pod.json.bad")
        return out

    def remove(self, uid: str) -> None:
        shutil.rmtree(self.pod_dir(uid), ignore_errors=True)
