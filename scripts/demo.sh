#!/usr/bin/env bash
# `make demo`: the main job on this machine, inside throwaway network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py "$@"
