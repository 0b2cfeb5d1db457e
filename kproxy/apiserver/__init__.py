"""The apiserver: the Kubernetes REST surface over :mod:`kproxy.store`.

Owns the HTTP handlers (per-kind registries, discovery, watch fan-out), the
cluster's credentials (:mod:`.certs`), authentication (:mod:`.authn`) and
authorization (:mod:`.authz`). It imports the store, the api object model,
errors, cryptography and aiohttp; never the client, the proxy or the kernel.
"""
