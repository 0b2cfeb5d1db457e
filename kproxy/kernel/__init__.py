"""The only package that touches the host.

It exposes semantic verbs (restore these tables, add this virtual server), not
argv, and each real implementation has a stateful fake in
:mod:`kproxy.kernel.fakes` held to the same contract suite.  It imports only
the standard library, pyroute2 and :mod:`kproxy.errors`.
"""
