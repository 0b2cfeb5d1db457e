"""Resource quantities (``100m``, ``1Gi``, ``2``, ``1e3``) as exact numbers.

Owns the grammar of ``resource.Quantity`` (a signed decimal number followed by a
binary suffix ``Ki Mi Gi Ti Pi Ei``, a decimal suffix ``n u m k M G T P E`` or an
exponent ``e3``/``E-2``) and conversion to exact :class:`~fractions.Fraction`
values, plus upstream's rounding helpers (``Value`` and ``MilliValue`` round up).

Invariant: parsing is exact (no floats), so sums of requests compare exactly, as
the scheduler's fit check needs.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from kproxy.api.errors import ApiError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(
    r"(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
# Upstream caps exponents well inside what an int64 of nano-units can hold.
_MAX_EXPONENT = 64


class QuantityError(ApiError):
    """A malformed quantity (400, as the apiserver reports an undecodable body)."""

    def __init__(self, text: str) -> None:
        super().__init__(
            400,
            "BadRequest",
            f"quantities must match the regular expression "
            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {text!r}",
        )


def parse_quantity(value: Any) -> Fraction:
    """The exact value of a quantity given as a string or a JSON number."""
    if isinstance(value, bool):
        raise QuantityError(str(value))
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QuantityError(str(value))
        return Fraction(str(value))
    if not isinstance(value, str):
        raise QuantityError(repr(value))
    match = _QUANTITY.fullmatch(value.strip())
    if match is None or not value.strip():
        raise QuantityError(value)
    number = Fraction(match["num"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    exponent = int(suffix[1:])
    if abs(exponent) > _MAX_EXPONENT:
        raise QuantityError(value)
    return number * Fraction(10) ** exponent


def is_quantity(value: Any) -> bool:
    try:
        parse_quantity(value)
    except QuantityError:
        return False
    return True


def value(quantity: Any) -> int:
    """``Quantity.Value()``: whole units, rounded up (``100m`` → 1)."""
    return math.ceil(parse_quantity(quantity))


def milli_value(quantity: Any) -> int:
    """``Quantity.MilliValue()``: thousandths, rounded up (``0.1`` CPU → 100)."""
    return math.ceil(parse_quantity(quantity) * 1000)
