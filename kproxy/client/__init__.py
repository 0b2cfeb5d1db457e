"""The client side of the control plane: how components reach cluster state.

Owns kubeconfig loading (:mod:`.kubeconfig`), the REST client (:mod:`.rest`, errors
in :mod:`.errors`) and informers (:mod:`.informer`: list, watch, relist, cache,
handlers). Imports the stdlib, aiohttp, yaml, kproxy.errors (and later kproxy.store
and kproxy.api for the in-process client); never the apiserver, proxy or kernel.
"""
