"""The Kubernetes object model kproxy serves: kinds, errors, selectors, patches, validation.

Objects stay JSON-shaped dicts, exactly as on the wire; this package gives them
meaning. Modules: :mod:`kinds` (served resources), :mod:`errors` (``Status``),
:mod:`meta` (ObjectMeta), :mod:`selectors`/:mod:`fieldselectors`, :mod:`patch`
(strategic merge; :mod:`patchmeta` holds the merge keys) and :mod:`jsonpatch`
(RFC 7386/6902), :mod:`defaults`, :mod:`validation` (with per-area modules),
:mod:`quantity`.

Invariant: imports only the standard library and :mod:`kproxy.errors`; no I/O.
"""
