"""The scheduler: pods without a node → filter → score → bind.

Modules: :mod:`.nodeinfo` (what each node holds and has left: the snapshot a cycle
works on), :mod:`.filters` (feasibility plugins, upstream's messages),
:mod:`.scores` (scoring plugins, normalization and upstream's default weights),
:mod:`.framework` (one scheduling decision, pure), :mod:`.queue` (pending pods with
backoff and the unschedulable set) and :mod:`.scheduler` (the loop, binding, events;
``run_scheduler``).

Invariant: everything but :mod:`.scheduler` and :mod:`.queue` is pure (no I/O), so a
decision is a function of (pod, snapshot, random seed). Imports kproxy.client,
kproxy.api, kproxy.errors and the stdlib only.
"""
