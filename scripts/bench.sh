#!/usr/bin/env bash
# Run every benchmark under bench/ (each is a script with main(argv)); results
# go to bench/out/. Extra arguments are passed to each bench, e.g.
#   scripts/bench.sh --steps 100,1000      (a quick run)
# Kernel stages need root (each runs in its own throwaway network namespace);
# without root the benches measure their pure parts only.
# bench/userspace_throughput.py (kproxy's userspace data path vs direct, HAProxy
# and socat, in client/node/backend namespaces) needs root, haproxy and socat;
# it ignores the other benches' arguments.
# bench/nfqueue_bench.py (NFQUEUE first-packet selection: handler verdicts/s, conn/s,
# connect latency and bulk throughput vs the iptables mode and the socket relay) needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

py=.venv/bin/python
out=bench/out
mkdir -p "$out"
status=0
for bench in bench/*.py; do
  name=$(basename "$bench" .py)
  case "$name" in _*) continue ;; esac  # package files and helpers
  extra=()
  # IPVS needs a kernel with ip_vs: the bench boots the VM tier's kernel itself.
  if [ "$name" = ipvs_sync ] && [ "${KPROXY_IN_VM:-}" != 1 ]; then extra=(--vm); fi
  echo "== bench/$name.py ${extra[*]} $*"
  # One bench failing must not hide the others' results; report it at the end.
  if ! "$py" -m "bench.$name" --out "$out" "${extra[@]}" "$@" 2>&1 | tee "$out/$name.log"; then
    echo "bench/$name.py failed (see $out/$name.log)" >&2
    status=1
  fi
done
exit $status
