"""The kubelet: this node in the API, and its pods as processes in their own netns.

Modules: :mod:`.command` (flags → :class:`~.kubelet.Kubelet`), :mod:`.kubelet` (wiring,
adoption, cleanup), :mod:`.node` (registration, Lease, NodeStatus), :mod:`.pod` (one
worker per pod: sandbox, containers, probes, status, termination), :mod:`.container`
(a container's state machine), :mod:`.probes`, :mod:`.backoff`, :mod:`.status` (pure
status computation), :mod:`.podspec` (reading a Pod), :mod:`.images` (built-in images),
:mod:`.process` (container processes), :mod:`.ipam` (host-local IPAM), :mod:`.state`
(what survives a restart) and :mod:`.server` (the kubelet API on 10250).

Imports kproxy.client, kproxy.api, kproxy.kernel and kproxy.errors only; never the
apiserver, the store or the proxy. Host changes go through :mod:`kproxy.kernel.podnet`.
"""
