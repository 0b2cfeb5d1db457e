"""Label selectors: parsing (upstream's lexer and grammar), printing and matching.

Owns ``labels.Parse`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``,
``>``, ``<``) with upstream's error texts, :class:`LabelSelector` conversion
(``matchLabels``/``matchExpressions`` of Deployments, ReplicaSets) and selectors from
plain maps (Service ``spec.selector``). Field selectors live in
:mod:`kproxy.api.fieldselectors`.

Invariants: a parsed selector's requirements are sorted by key and their values
are sets, so ``parse(str(s)) == s``; every error is an :class:`ApiError` 400 (the
apiserver answers a bad ``labelSelector`` with BadRequest).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.api.errors import ApiError, FieldError
from kproxy.api.meta import is_qualified_name, is_valid_label_value


class Op(enum.Enum):
    IN = "in"
    NOT_IN = "notin"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GT = "gt"
    LT = "lt"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: tuple[str, ...] = ()  # sorted, unique

    @classmethod
    def make(cls, key: str, op: Op, values: Iterable[str] = ()) -> Requirement:
        """``labels.NewRequirement``: validates the key, values and their count."""
        vals = tuple(sorted(set(values)))
        problems = [f"key: Invalid value: {key!r}: {m}" for m in is_qualified_name(key)]
        if op in (Op.IN, Op.NOT_IN):
            if not vals:
                problems.append("for 'in', 'notin' operators, values set can't be empty")
        elif op in (Op.EQUALS, Op.DOUBLE_EQUALS, Op.NOT_EQUALS):
            if len(vals) != 1:
                problems.append("exact-match compatibility requires one single value")
        elif op in (Op.EXISTS, Op.DOES_NOT_EXIST):
            if vals:
                problems.append("values set must be empty for exists and does not exist")
        else:
            if len(vals) != 1:
                problems.append("for 'Gt', 'Lt' operators, exactly one value is required")
            for v in vals:
                try:
                    int(v)
                except ValueError:
                    problems.append("for 'Gt', 'Lt' operators, the value must be an integer")
        for v in vals:
            problems.extend(f"values: Invalid value: {v!r}: {m}" for m in is_valid_label_value(v))
        if problems:
            raise ApiError.bad_request("; ".join(problems))
        return cls(key, op, vals)

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in (Op.IN, Op.EQUALS, Op.DOUBLE_EQUALS):
            return present and value in self.values
        if self.op in (Op.NOT_IN, Op.NOT_EQUALS):
            return not present or value not in self.values
        if self.op is Op.EXISTS:
            return present
        if self.op is Op.DOES_NOT_EXIST:
            return not present
        if not present or value is None:
            return False
        try:
            have, want = int(value), int(self.values[0])
        except ValueError:
            return False
        return have > want if self.op is Op.GT else have < want

    def __str__(self) -> str:
        if self.op is Op.EXISTS:
            return self.key
        if self.op is Op.DOES_NOT_EXIST:
            return "!" + self.key
        if self.op in (Op.IN, Op.NOT_IN):
            # A lone empty value prints as "(,)": upstream's "()" would not parse back.
            inner = "," if self.values == ("",) else ",".join(self.values)
            return f"{self.key} {self.op.value} ({inner})"
        if self.op is Op.GT:
            return f"{self.key}>{self.values[0]}"
        if self.op is Op.LT:
            return f"{self.key}<{self.values[0]}"
        return f"{self.key}{self.op.value}{self.values[0]}"


@dataclass(frozen=True, slots=True)
class Selector:
    """A conjunction of requirements; ``nothing`` matches no object at all."""

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.nothing:
            return False
        have = labels or {}
        return all(r.matches(have) for r in self.requirements)

    def matches_object(self, obj: Mapping[str, Any]) -> bool:
        return self.matches((obj.get("metadata") or {}).get("labels"))

    @property
    def empty(self) -> bool:
        """True when the selector matches everything."""
        return not self.requirements and not self.nothing

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


EVERYTHING = Selector()
NOTHING = Selector(nothing=True)

# ------------------------------------------------------------------ lexer

_SPECIAL = "=!(),><"
_WHITESPACE = " \t\r\n"
_OPERATOR_TOKENS = ("==", "!=", "=", "!", "(", ")", ",", ">", "<")


class _Tok(enum.Enum):
    ERROR = "error"
    END = "end of string"
    IDENT = "identifier"
    COMMA = ","
    OPEN = "("
    CLOSE = ")"
    BANG = "!"
    EQ = "="
    EQEQ = "=="
    NEQ = "!="
    GT = ">"
    LT = "<"
    IN = "in"
    NOTIN = "notin"


_TOKEN_OF = {t.value: t for t in _Tok if t not in (_Tok.ERROR, _Tok.END, _Tok.IDENT)}


def _lex(text: str) -> list[tuple[_Tok, str]]:
    tokens: list[tuple[_Tok, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch in _SPECIAL:
            for op in _OPERATOR_TOKENS:
                if text.startswith(op, i):
                    tokens.append((_TOKEN_OF[op], op))
                    i += len(op)
                    break
            else:  # pragma: no cover - every special char starts an operator
                raise AssertionError(ch)
        else:
            j = i
            while j < n and text[j] not in _WHITESPACE and text[j] not in _SPECIAL:
                j += 1
            word = text[i:j]
            kw = _TOKEN_OF.get(word)
            tokens.append((kw if kw in (_Tok.IN, _Tok.NOTIN) else _Tok.IDENT, word))
            i = j
    tokens.append((_Tok.END, ""))
    return tokens


class _Parser:
    """Upstream's recursive-descent parser; 'values' mode reads in/notin as identifiers."""

    def __init__(self, text: str) -> None:
        self.tokens = _lex(text)
        self.pos = 0

    def _peek(self, values: bool = False) -> tuple[_Tok, str]:
        tok, lit = self.tokens[self.pos]
        if values and tok in (_Tok.IN, _Tok.NOTIN):
            tok = _Tok.IDENT
        return tok, lit

    def _next(self, values: bool = False) -> tuple[_Tok, str]:
        out = self._peek(values)
        if self.pos < len(self.tokens) - 1:
            self.pos += 1
        return out

    @staticmethod
    def _fail(message: str) -> ApiError:
        return ApiError.bad_request(f"unable to parse requirement: {message}")

    def parse(self) -> list[Requirement]:
        reqs: list[Requirement] = []
        while True:
            tok, lit = self._peek(values=True)
            if tok is _Tok.END:
                return reqs
            if tok not in (_Tok.IDENT, _Tok.BANG):
                raise self._fail(f"found '{lit}', expected: !, identifier, or 'end of string'")
            reqs.append(self._requirement())
            tok, lit = self._next(values=True)
            if tok is _Tok.END:
                return reqs
            if tok is not _Tok.COMMA:
                raise self._fail(f"found '{lit}', expected: ',' or 'end of string'")
            nxt, nlit = self._peek(values=True)
            if nxt not in (_Tok.IDENT, _Tok.BANG):
                raise self._fail(f"found '{nlit}', expected: identifier after ','")

    def _requirement(self) -> Requirement:
        op: Op | None = None
        tok, lit = self._next(values=True)
        if tok is _Tok.BANG:
            op = Op.DOES_NOT_EXIST
            tok, lit = self._next(values=True)
        if tok is not _Tok.IDENT:
            raise self._fail(f"found '{lit}', expected: identifier")
        key = lit
        nxt, _ = self._peek(values=True)
        if nxt in (_Tok.END, _Tok.COMMA):
            return Requirement.make(key, op or Op.EXISTS)
        if op is Op.DOES_NOT_EXIST:
            raise self._fail(f"found '{self._peek()[1]}', expected: ',' or 'end of string'")
        tok, lit = self._next()
        ops = {
            _Tok.EQ: Op.EQUALS,
            _Tok.EQEQ: Op.DOUBLE_EQUALS,
            _Tok.NEQ: Op.NOT_EQUALS,
            _Tok.IN: Op.IN,
            _Tok.NOTIN: Op.NOT_IN,
            _Tok.GT: Op.GT,
            _Tok.LT: Op.LT,
        }
        if tok not in ops:
            raise self._fail(f"found '{lit}', expected: in, notin, =, ==, !=, gt, lt")
        op = ops[tok]
        values = self._set_values() if op in (Op.IN, Op.NOT_IN) else self._exact_value()
        return Requirement.make(key, op, values)

    def _exact_value(self) -> list[str]:
        tok, lit = self._peek(values=True)
        if tok in (_Tok.END, _Tok.COMMA):
            return [""]
        tok, lit = self._next(values=True)
        if tok is _Tok.IDENT:
            return [lit]
        raise self._fail(f"found '{lit}', expected: identifier")

    def _set_values(self) -> list[str]:
        tok, lit = self._next(values=True)
        if tok is not _Tok.OPEN:
            raise self._fail(f"found '{lit}' expected: '('")
        tok, lit = self._peek(values=True)
        if tok is _Tok.CLOSE:
            self._next()
            return []
        if tok not in (_Tok.IDENT, _Tok.COMMA):
            raise self._fail(f"found '{lit}', expected: ',', ')' or identifier")
        values: list[str] = []
        while True:
            tok, lit = self._next(values=True)
            if tok is _Tok.IDENT:
                values.append(lit)
                nxt, nlit = self._peek(values=True)
                if nxt is _Tok.COMMA:
                    continue
                if nxt is _Tok.CLOSE:
                    self._next()
                    return values
                raise self._fail(f"found '{nlit}', expected: ',' or ')'")
            if tok is _Tok.COMMA:
                # An empty slot between commas (or before ')') is the empty value.
                if not values:
                    values.append("")
                nxt, _ = self._peek(values=True)
                if nxt is _Tok.CLOSE:
                    self._next()
                    values.append("")
                    return values
                if nxt is _Tok.COMMA:
                    self._next()
                    values.append("")
                continue
            raise self._fail(f"found '{lit}', expected: ',', or identifier")


def parse(text: str) -> Selector:
    """Parse a ``labelSelector`` query string; ``""`` selects everything."""
    reqs = _Parser(text).parse()
    return Selector(tuple(sorted(reqs, key=lambda r: r.key)))


def from_set(labels: Mapping[str, str] | None) -> Selector:
    """``labels.SelectorFromSet``: every key equals its value (empty map: everything)."""
    if not labels:
        return EVERYTHING
    reqs = [Requirement.make(k, Op.EQUALS, [v]) for k, v in labels.items()]
    return Selector(tuple(sorted(reqs, key=lambda r: r.key)))


# ------------------------------------------------------- metav1.LabelSelector

_EXPRESSION_OPS = {
    "In": Op.IN,
    "NotIn": Op.NOT_IN,
    "Exists": Op.EXISTS,
    "DoesNotExist": Op.DOES_NOT_EXIST,
}


def validate_label_selector(selector: Any, path: str) -> list[FieldError]:
    """``ValidateLabelSelector``: field errors for a ``metav1.LabelSelector`` object."""
    if selector is None:
        return []
    if not isinstance(selector, Mapping):
        return [FieldError.invalid(path, selector, "must be an object")]
    errs: list[FieldError] = []
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        errs.append(FieldError.invalid(f"{path}.matchLabels", match_labels, "must be a map"))
    else:
        for key, value in match_labels.items():
            errs.extend(
                FieldError.invalid(f"{path}.matchLabels", key, m) for m in is_qualified_name(key)
            )
            if not isinstance(value, str):
                errs.append(FieldError.invalid(f"{path}.matchLabels", value, "must be a string"))
                continue
            errs.extend(
                FieldError.invalid(f"{path}.matchLabels", value, m)
                for m in is_valid_label_value(value)
            )
    exprs = selector.get("matchExpressions") or []
    if not isinstance(exprs, list):
        return [*errs, FieldError.invalid(f"{path}.matchExpressions", exprs, "must be a list")]
    for i, expr in enumerate(exprs):
        p = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            errs.append(FieldError.invalid(p, expr, "must be an object"))
            continue
        op = expr.get("operator")
        values = expr.get("values") or []
        if op in ("In", "NotIn"):
            if not values:
                errs.append(
                    FieldError.required(
                        f"{p}.values", "must be specified when `operator` is 'In' or 'NotIn'"
                    )
                )
        elif op in ("Exists", "DoesNotExist"):
            if values:
                errs.append(
                    FieldError.forbidden(
                        f"{p}.values",
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    )
                )
        else:
            errs.append(FieldError.invalid(f"{p}.operator", op, "not a valid selector operator"))
        key = expr.get("key")
        if not isinstance(key, str):
            errs.append(FieldError.required(f"{p}.key"))
        else:
            errs.extend(FieldError.invalid(f"{p}.key", key, m) for m in is_qualified_name(key))
        if isinstance(values, list):
            for j, v in enumerate(values):
                msgs = is_valid_label_value(v) if isinstance(v, str) else ["must be a string"]
                errs.extend(FieldError.invalid(f"{p}.values[{j}]", v, m) for m in msgs)
    return errs


def from_label_selector(selector: Mapping[str, Any] | None) -> Selector:
    """``metav1.LabelSelectorAsSelector``: ``None`` selects nothing, ``{}`` everything."""
    if selector is None:
        return NOTHING
    reqs: list[Requirement] = []
    for key, value in (selector.get("matchLabels") or {}).items():
        reqs.append(Requirement.make(key, Op.EQUALS, [value]))
    for expr in selector.get("matchExpressions") or []:
        op = _EXPRESSION_OPS.get(expr.get("operator", ""))
        if op is None:
            raise ApiError.bad_request(
                f"{expr.get('operator')!r} is not a valid label selector operator"
            )
        reqs.append(Requirement.make(expr.get("key", ""), op, expr.get("values") or []))
    return Selector(tuple(sorted(reqs, key=lambda r: r.key)))
