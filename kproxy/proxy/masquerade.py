"""The masquerade mark, shared by every mode that writes kube-proxy's SNAT rules.

``--iptables-masquerade-bit`` (default 14) selects the fwmark bit that
KUBE-MARK-MASQ sets and KUBE-POSTROUTING tests; real kube-proxy prints it
with Go's ``%#08x``, hence ``0x00004000`` (upstream's unit tests use ``0x4000``).
"""

from __future__ import annotations


def masquerade_mark(bit: int = 14) -> str:
    """Go's ``fmt.Sprintf("%#08x", 1<<bit)``: 8 digits after ``0x`` (``0x00004000``)."""
    if not 0 <= bit <= 31:
        raise ValueError(f"--iptables-masquerade-bit must be in [0, 31], got {bit}")
    return f"0x{1 << bit:08x}"
