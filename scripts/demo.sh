#!/usr/bin/env bash
# `make demo`: the main job on this machine, inside throwaway network namespaces.
#   1. one node, the proxy in iptables mode following an objects file: kproxy render,
#      traffic to ClusterIP/NodePort, REJECT, health/metrics, a partial sync;
#   2. the whole cluster on the embedded default (SQLite): apiserver, controller-manager,
#      scheduler, two nodes with a kubelet and the proxy, in each mode this machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/demo_objects.py
exec .venv/bin/python scripts/demo.py "$@"
