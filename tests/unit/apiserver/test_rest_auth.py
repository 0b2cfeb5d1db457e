"""Authentication and authorization on the secure port (TLS, certs, tokens, nodes)."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from kproxy.apiserver import certs
from kproxy.client.kubeconfig import load_kubeconfig
from tests.unit.apiserver.harness import MANIFESTS, apiserver


async def _call(
    session: aiohttp.ClientSession,
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with session.request(method, url, data=data, headers=hdrs) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def test_secure_port_authn_authz(tmp_path: Path) -> None:
    async def main() -> None:
        async with apiserver(tmp_path) as h:
            server = h.server
            assert server.pki is not None
            base = server.secure_url
            ca = ssl.create_default_context(cafile=str(server.pki.ca_cert))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ca)) as anon:
                assert (await _call(anon, base + "/healthz"))[0] == 200
                assert (await _call(anon, base + "/version"))[0] == 200
                status, err = await _call(anon, base + "/api/v1/pods")
                assert status == 401 and err["reason"] == "Unauthorized"
                status, _ = await _call(
                    anon, base + "/api/v1/pods", headers={"Authorization": "Bearer nope"}
                )
                assert status == 401
                token = {"Authorization": f"Bearer {server.pki.admin_token}"}
                assert (await _call(anon, base + "/api/v1/pods", headers=token))[0] == 200

            cfg = load_kubeconfig(server.pki.admin_kubeconfig)
            assert cfg.server == base
            admin_conn = aiohttp.TCPConnector(ssl=cfg.ssl_context)
            async with aiohttp.ClientSession(connector=admin_conn) as admin:
                status, _ = await _call(admin, base + "/api/v1/namespaces/default/pods")
                assert status == 200

            # a node may write its own Node and Lease, read pods, not touch others'
            creds = certs.ensure_node_credentials(server.pki, "n1")
            node_cfg = load_kubeconfig(creds.kubeconfig)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=node_cfg.ssl_context)
            ) as node:
                status, _ = await _call(
                    node, base + "/api/v1/nodes", "POST", {"metadata": {"name": "n1"}}
                )
                assert status == 201
                status, err = await _call(
                    node, base + "/api/v1/nodes", "POST", {"metadata": {"name": "n2"}}
                )
                assert status == 403 and err["reason"] == "Forbidden", err
                lease = {"metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}}
                leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
                assert (await _call(node, base + leases, "POST", lease))[0] == 201
                assert (await _call(node, base + "/api/v1/pods"))[0] == 200
                path, pod = MANIFESTS["pods"]
                await h.ok("POST", path, pod)
                status, _ = await _call(
                    node,
                    base + f"{path}/p1/status",
                    "PATCH",
                    {"status": {"phase": "Running"}},
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert status == 403  # not bound to n1
                status, _ = await _call(node, base + "/apis/apps/v1/deployments")
                assert status == 403
                await h.ok(
                    "POST",
                    f"{path}/p1/binding",
                    {"target": {"kind": "Node", "name": "n1"}, "metadata": {"name": "p1"}},
                )
                status, out = await _call(
                    node,
                    base + f"{path}/p1/status",
                    "PATCH",
                    {"status": {"phase": "Running"}},
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert status == 200 and out["status"]["phase"] == "Running"

    asyncio.run(asyncio.wait_for(main(), 60))
