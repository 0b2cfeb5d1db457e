#!/usr/bin/env bash
# Set up a fresh Debian 12/13 machine for kproxy; idempotent and quick when done.
#
# 1. Debian packages the project needs, installed only when missing
#    (`apt-get update` runs once, and only if something is missing).
# 2. .venv with the project (editable, so the Cython extension is built in
#    place) and its test and bench extras, rebuilt only when the build inputs
#    changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  iptables ipset conntrack iproute2 ipvsadm
  libnetfilter-queue-dev
  qemu-system-x86 linux-image-amd64
  etcd-server haproxy socat
  gcc make busybox-static
)

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "bootstrap: $python must be Python >= 3.11" >&2
  exit 1
fi
# Debian's own python3 needs venv and headers from separate packages.
"$python" -c 'import ensurepip, venv' 2>/dev/null || PACKAGES+=(python3-venv)
inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || PACKAGES+=(python3-dev)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
fi

stamp=.venv/.kproxy-bootstrap
# The extension's sources: the .pyx and every .pxi it includes.
inputs=(pyproject.toml setup.py kproxy/_fastpath.pyx kproxy/_fastpath_*.pxi scripts/bootstrap.sh)
fresh=1
if [ -f "$stamp" ] && [ -x .venv/bin/python ]; then
  for f in "${inputs[@]}"; do
    [ "$f" -nt "$stamp" ] && fresh=0
  done
  # The extension may have been removed (make clean) while the venv stayed.
  if [ -z "${KPROXY_NO_EXTENSIONS:-}" ] && ! ls kproxy/_fastpath.*.so >/dev/null 2>&1; then
    fresh=0
  fi
else
  fresh=0
fi
if [ "$fresh" -eq 1 ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "bootstrap: installing kproxy and its test/bench extras into .venv"
.venv/bin/python -m pip install -q -e '.[test,bench]'
.venv/bin/python -c 'import kproxy.fastpath as f; print("bootstrap: fast path =", f.IMPLEMENTATION)'
touch "$stamp"
