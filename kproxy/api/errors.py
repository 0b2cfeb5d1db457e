"""Kubernetes API errors: :class:`ApiError` carries a ``metav1.Status``.

Owns the mapping from a failure to the Status body kube-apiserver writes
(``k8s.io/apimachinery/pkg/api/errors``): reason, HTTP code, message wording and
``details`` (name, group, kind, causes). Also owns :class:`FieldError`, one
validation cause (``field.Error`` upstream), whose text matches upstream's
``ErrorBody`` so ``kubectl`` prints what users know.

Invariants:

- ``ApiError.to_status()`` keys come in upstream's order (kind, apiVersion,
  metadata, status, message, reason, details, code); empty ``details`` members are
  omitted, as Go's ``omitempty`` does.
- ``ApiError.from_status(e.to_status())`` round-trips.
- Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.errors import KProxyError


class FieldErrorType(enum.Enum):
    """``field.ErrorType``: value = (text in messages, cause reason in Status)."""

    NOT_FOUND = ("Not found", "FieldValueNotFound")
    REQUIRED = ("Required value", "FieldValueRequired")
    DUPLICATE = ("Duplicate value", "FieldValueDuplicate")
    INVALID = ("Invalid value", "FieldValueInvalid")
    NOT_SUPPORTED = ("Unsupported value", "FieldValueNotSupported")
    FORBIDDEN = ("Forbidden", "FieldValueForbidden")
    TOO_LONG = ("Too long", "FieldValueTooLong")
    TOO_MANY = ("Too many", "FieldValueTooMany")
    INTERNAL = ("Internal error", "InternalError")

    @property
    def text(self) -> str:
        return self.value[0]

    @property
    def reason(self) -> str:
        return self.value[1]


_NO_VALUE: Any = object()
# Upstream prints only the type (no bad value) for these.
_VALUELESS = {
    FieldErrorType.REQUIRED,
    FieldErrorType.FORBIDDEN,
    FieldErrorType.TOO_LONG,
    FieldErrorType.INTERNAL,
}


def _go_value(value: Any) -> str:
    """The bad value as upstream prints it: %q for strings, %v for scalars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure at a field path such as ``spec.ports[0].port``."""

    type: FieldErrorType
    field: str
    value: Any = _NO_VALUE
    detail: str = ""

    def body(self) -> str:
        """Upstream's ``ErrorBody``: ``Invalid value: 0: must be between ...``."""
        if self.type in _VALUELESS or self.value is _NO_VALUE:
            text = self.type.text
        else:
            text = f"{self.type.text}: {_go_value(self.value)}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()

    def cause(self) -> dict[str, str]:
        return {"reason": self.type.reason, "message": self.body(), "field": self.field}

    # Constructors named as upstream's field.Required / field.Invalid / ...
    @classmethod
    def required(cls, path: str, detail: str = "") -> FieldError:
        return cls(FieldErrorType.REQUIRED, path, _NO_VALUE, detail)

    @classmethod
    def invalid(cls, path: str, value: Any, detail: str) -> FieldError:
        return cls(FieldErrorType.INVALID, path, value, detail)

    @classmethod
    def not_supported(cls, path: str, value: Any, supported: Iterable[str]) -> FieldError:
        values = ", ".join(json.dumps(s) for s in supported)
        return cls(FieldErrorType.NOT_SUPPORTED, path, value, f"supported values: {values}")

    @classmethod
    def duplicate(cls, path: str, value: Any) -> FieldError:
        return cls(FieldErrorType.DUPLICATE, path, value)

    @classmethod
    def forbidden(cls, path: str, detail: str) -> FieldError:
        return cls(FieldErrorType.FORBIDDEN, path, _NO_VALUE, detail)

    @classmethod
    def too_long(cls, path: str, max_length: int) -> FieldError:
        return cls(
            FieldErrorType.TOO_LONG, path, _NO_VALUE, f"must have at most {max_length} bytes"
        )

    @classmethod
    def too_many(cls, path: str, actual: int, max_items: int) -> FieldError:
        return cls(FieldErrorType.TOO_MANY, path, actual, f"must have at most {max_items} items")

    @classmethod
    def not_found(cls, path: str, value: Any) -> FieldError:
        return cls(FieldErrorType.NOT_FOUND, path, value)


def _aggregate(errors: Sequence[FieldError]) -> str:
    # utilerrors.NewAggregate: one error prints bare, several as "[a, b]", deduplicated.
    texts = list(dict.fromkeys(str(e) for e in errors))
    if len(texts) == 1:
        return texts[0]
    return "[" + ", ".join(texts) + "]"


def _qualified(name: str, group: str) -> str:
    return f"{name}.{group}" if group else name


@dataclass(frozen=True, slots=True)
class Details:
    """``metav1.StatusDetails``; ``kind`` is the resource (plural) for most reasons."""

    name: str = ""
    group: str = ""
    kind: str = ""
    uid: str = ""
    causes: tuple[dict[str, str], ...] = ()
    retry_after_seconds: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (
            ("name", self.name),
            ("group", self.group),
            ("kind", self.kind),
            ("uid", self.uid),
        ):
            if value:
                out[key] = value
        if self.causes:
            out["causes"] = [dict(c) for c in self.causes]
        if self.retry_after_seconds:
            out["retryAfterSeconds"] = self.retry_after_seconds
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Details:
        return cls(
            name=str(data.get("name", "")),
            group=str(data.get("group", "")),
            kind=str(data.get("kind", "")),
            uid=str(data.get("uid", "")),
            causes=tuple(dict(c) for c in data.get("causes") or ()),
            retry_after_seconds=int(data.get("retryAfterSeconds", 0)),
        )


class ApiError(KProxyError):
    """A failed API request, shaped as the ``Status`` kube-apiserver would return."""

    def __init__(
        self, code: int, reason: str, message: str, details: Details | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details if details is not None else Details()

    def __repr__(self) -> str:
        return f"ApiError({self.code}, {self.reason!r}, {self.message!r})"

    @property
    def causes(self) -> tuple[dict[str, str], ...]:
        return self.details.causes

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        details = self.details.to_dict()
        if details:
            status["details"] = details
        status["code"] = self.code
        return status

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ApiError:
        return cls(
            int(status.get("code", 500)),
            str(status.get("reason", "")),
            str(status.get("message", "")),
            Details.from_dict(status.get("details") or {}),
        )

    # ------------------------------------------------------------- constructors
    # Each mirrors the upstream constructor of the same name (errors.go).

    @classmethod
    def not_found(cls, resource: str, name: str, group: str = "") -> ApiError:
        return cls(
            404,
            "NotFound",
            f'{_qualified(resource, group)} "{name}" not found',
            Details(name=name, group=group, kind=resource),
        )

    @classmethod
    def already_exists(cls, resource: str, name: str, group: str = "") -> ApiError:
        return cls(
            409,
            "AlreadyExists",
            f'{_qualified(resource, group)} "{name}" already exists',
            Details(name=name, group=group, kind=resource),
        )

    @classmethod
    def conflict(
        cls,
        resource: str,
        name: str,
        why: str = "the object has been modified; please apply your changes to the "
        "latest version and try again",
        group: str = "",
    ) -> ApiError:
        return cls(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {why}',
            Details(name=name, group=group, kind=resource),
        )

    @classmethod
    def invalid(
        cls, kind: str, name: str, causes: Sequence[FieldError], group: str = ""
    ) -> ApiError:
        """422 with one cause per field error; ``kind`` is the Kind (``Service``)."""
        return cls(
            422,
            "Invalid",
            f'{_qualified(kind, group)} "{name}" is invalid: {_aggregate(causes)}',
            Details(name=name, group=group, kind=kind, causes=tuple(c.cause() for c in causes)),
        )

    @classmethod
    def unprocessable(cls, message: str) -> ApiError:
        """422 without field causes (upstream's generic response for a failed patch)."""
        return cls(422, "Invalid", message)

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequest", message)

    @classmethod
    def gone(cls, message: str) -> ApiError:
        return cls(410, "Gone", message)

    @classmethod
    def expired(cls, message: str) -> ApiError:
        """410 Expired: a too-old resourceVersion or an expired continue token."""
        return cls(410, "Expired", message)

    @classmethod
    def too_old_resource_version(cls, requested: int, oldest: int) -> ApiError:
        return cls.expired(f"too old resource version: {requested} ({oldest})")

    @classmethod
    def unsupported_media_type(cls, content_type: str) -> ApiError:
        return cls(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types "
            f"include: application/json-patch+json, application/merge-patch+json, "
            f'application/strategic-merge-patch+json (got "{content_type}")',
        )

    @classmethod
    def not_acceptable(cls, message: str) -> ApiError:
        return cls(406, "NotAcceptable", message)

    @classmethod
    def method_not_allowed(cls, resource: str, action: str, group: str = "") -> ApiError:
        return cls(
            405,
            "MethodNotAllowed",
            f'{action} is not supported on resources of kind "{_qualified(resource, group)}"',
            Details(group=group, kind=resource),
        )

    @classmethod
    def forbidden(cls, resource: str, name: str, why: str, group: str = "") -> ApiError:
        if not resource:
            message = f"forbidden: {why}"
        elif not name:
            message = f"{_qualified(resource, group)} is forbidden: {why}"
        else:
            message = f'{_qualified(resource, group)} "{name}" is forbidden: {why}'
        return cls(403, "Forbidden", message, Details(name=name, group=group, kind=resource))

    @classmethod
    def unauthorized(cls, why: str = "") -> ApiError:
        return cls(401, "Unauthorized", why or "not authorized")

    @classmethod
    def too_many_requests(cls, message: str, retry_after_seconds: int) -> ApiError:
        return cls(
            429,
            "TooManyRequests",
            message,
            Details(retry_after_seconds=retry_after_seconds),
        )

    @classmethod
    def internal(cls, why: str) -> ApiError:
        return cls(
            500,
            "InternalError",
            f"Internal error occurred: {why}",
            Details(causes=({"message": why},)),
        )


@dataclass(slots=True)
class FieldErrors:
    """An accumulating error list (``field.ErrorList``), raised as one Invalid error."""

    items: list[FieldError] = field(default_factory=list)

    def add(self, error: FieldError) -> None:
        self.items.append(error)

    def extend(self, errors: Iterable[FieldError]) -> None:
        self.items.extend(errors)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_invalid(self, kind: str, name: str, group: str = "") -> None:
        if self.items:
            raise ApiError.invalid(kind, name, self.items, group)
