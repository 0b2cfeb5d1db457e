#!/usr/bin/env bash
# Provision one kproxy node (run by Vagrant as root; NODE_INDEX, NODES, NODE_NET, PROXY_MODE).
# Pod CIDRs are fixed per node (10.244.<i>.0/24) so that every node can route the
# others' pod CIDRs ("host-gw") from the start, as the one-machine cluster does.
set -euo pipefail
cd /vagrant
i="$NODE_INDEX"
name="node-$i"
ip="$NODE_NET.$((10 + i))"
api="$NODE_NET.11"
shared=/vagrant/vagrant/.cluster
state=/var/lib/kproxy
mkdir -p "$state" "$shared"

scripts/bootstrap.sh
ln -sf /vagrant/.venv/bin/kproxy /usr/local/bin/kproxy

sysctl -qw net.ipv4.ip_forward=1
for j in $(seq 1 "$NODES"); do
  [ "$j" = "$i" ] && continue
  ip route replace "10.244.$j.0/24" via "$NODE_NET.$((10 + j))"
done

unit() {  # name, command line
  cat > "/etc/systemd/system/kproxy-$1.service" <<UNIT
[Unit]
Description=kproxy $1
After=network-online.target
[Service]
ExecStart=$2
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now "kproxy-$1.service"
}

if [ "$i" = 1 ]; then
  unit apiserver "/usr/local/bin/kproxy apiserver --data-dir $state/apiserver --bind-address 0.0.0.0 --advertise-address $api --service-cluster-ip-range 10.96.0.0/12"
  for _ in $(seq 1 60); do [ -f "$state/apiserver/admin.kubeconfig" ] && break; sleep 1; done
  cp "$state/apiserver/admin.kubeconfig" "$shared/admin.kubeconfig"
  # Node credentials for every node, signed by the cluster CA.
  /vagrant/.venv/bin/python - "$state/apiserver" "$shared" "$NODES" "$api" <<'PY'
import shutil, sys
from pathlib import Path
from kproxy.apiserver.certs import ensure_node_credentials, ensure_pki
data, shared, nodes, api = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pki = ensure_pki(data, bind_address="0.0.0.0", advertise_address=api)
for i in range(1, nodes + 1):
    creds = ensure_node_credentials(pki, f"node-{i}")
    shutil.copy(creds.kubeconfig, shared / f"node-{i}.kubeconfig")
PY
  unit controller-manager "/usr/local/bin/kproxy controller-manager --kubeconfig $shared/admin.kubeconfig --cluster-cidr 10.244.0.0/16 --allocate-node-cidrs=false"
  unit scheduler "/usr/local/bin/kproxy scheduler --kubeconfig $shared/admin.kubeconfig"
fi

for _ in $(seq 1 120); do [ -f "$shared/$name.kubeconfig" ] && break; sleep 1; done
kc="$shared/$name.kubeconfig"
unit kubelet "/usr/local/bin/kproxy kubelet --kubeconfig $kc --hostname-override $name --node-ip $ip --pod-cidr 10.244.$i.0/24 --root-dir $state/kubelet"
unit proxy "/usr/local/bin/kproxy proxy --kubeconfig $kc --hostname-override $name --node-ip $ip --proxy-mode $PROXY_MODE --cluster-cidr 10.244.0.0/16"
