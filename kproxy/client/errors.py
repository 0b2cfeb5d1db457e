"""Typed errors for Kubernetes ``Status`` failures, as a client sees them.

Owns :class:`ApiStatusError` and its subclasses, and :func:`status_error`, which maps a
``metav1.Status`` body (or a bare HTTP code when the body is not a Status) to the most
specific subclass: first by ``reason``, then by ``code``. Every instance keeps the
whole Status so nothing the server said is lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kproxy.errors import KProxyError

_DEFAULT_REASON = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ClientError(KProxyError):
    """The apiserver could not be reached or answered with something unusable."""


class ApiStatusError(ClientError):
    """The apiserver answered with a failure ``Status``."""

    def __init__(self, code: int, reason: str, message: str, status: Mapping[str, Any]) -> None:
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.message = message
        self.status = dict(status)

    @property
    def details(self) -> Mapping[str, Any]:
        return self.status.get("details") or {}


class BadRequest(ApiStatusError):
    pass


class Unauthorized(ApiStatusError):
    pass


class Forbidden(ApiStatusError):
    pass


class NotFound(ApiStatusError):
    pass


class MethodNotAllowed(ApiStatusError):
    pass


class AlreadyExists(ApiStatusError):
    """409 on create: the name is taken."""


class Conflict(ApiStatusError):
    """409 on update: the resourceVersion was stale; re-read and retry."""


class Gone(ApiStatusError):
    """410: the requested resourceVersion (or continue token) is too old; relist."""


Expired = Gone


class UnsupportedMediaType(ApiStatusError):
    pass


class Invalid(ApiStatusError):
    """422: validation failed; ``details['causes']`` says where."""


class TooManyRequests(ApiStatusError):
    pass


class ServerError(ApiStatusError):
    """5xx."""


_BY_REASON: dict[str, type[ApiStatusError]] = {
    "BadRequest": BadRequest,
    "Unauthorized": Unauthorized,
    "Forbidden": Forbidden,
    "NotFound": NotFound,
    "MethodNotAllowed": MethodNotAllowed,
    "AlreadyExists": AlreadyExists,
    "Conflict": Conflict,
    "Gone": Gone,
    "Expired": Gone,
    "UnsupportedMediaType": UnsupportedMediaType,
    "Invalid": Invalid,
    "TooManyRequests": TooManyRequests,
}

_BY_CODE: dict[int, type[ApiStatusError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    415: UnsupportedMediaType,
    422: Invalid,
    429: TooManyRequests,
}


def status_error(status: Mapping[str, Any] | None, http_code: int = 0) -> ApiStatusError:
    """The typed error for a failure Status (``http_code`` fills in a missing ``code``)."""
    status = status if isinstance(status, Mapping) else {}
    raw_code = status.get("code")
    code = raw_code if isinstance(raw_code, int) and raw_code else http_code
    reason = str(status.get("reason") or _DEFAULT_REASON.get(code, "Unknown"))
    message = str(status.get("message") or "")
    if status.get("kind") != "Status":
        # Not a Status (a proxy's HTML page, say): keep what we got for the message.
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
        }
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code)
    if cls is None:
        cls = ServerError if code >= 500 else ApiStatusError
    return cls(code, reason, message, status)
