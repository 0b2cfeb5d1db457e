"""The IPVS proxy mode.

Owns the pure planner: :mod:`~kproxy.proxy.ipvs.options` (flags and host facts),
:mod:`~kproxy.proxy.ipvs.ipsets` (upstream's 17 sets, their types and entry
strings), :mod:`~kproxy.proxy.ipvs.rules` (the fixed nat/filter glue rules) and
:mod:`~kproxy.proxy.ipvs.plan` (snapshot → :class:`IpvsPlan`), plus
:func:`render_ipvs` for ``kproxy render ipvs``. The thin applier that diffs a plan
against the kernel lives beside it and is the only part that does I/O.

This package never imports another proxy mode.
"""

from kproxy.proxy.ipvs.ipsets import IPSet, IPSetEntry
from kproxy.proxy.ipvs.options import IpvsOptions, ipvs_options, masquerade_mark, sysctls
from kproxy.proxy.ipvs.plan import DUMMY_DEVICE, IpvsPlan, PlannedServer, plan_ipvs
from kproxy.proxy.ipvs.render import render_ipvs
from kproxy.proxy.ipvs.rules import JUMP_RULES, JumpRule

__all__ = [
    "DUMMY_DEVICE",
    "JUMP_RULES",
    "IPSet",
    "IPSetEntry",
    "IpvsOptions",
    "IpvsPlan",
    "JumpRule",
    "PlannedServer",
    "ipvs_options",
    "masquerade_mark",
    "plan_ipvs",
    "render_ipvs",
    "sysctls",
]
