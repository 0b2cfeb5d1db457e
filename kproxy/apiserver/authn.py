"""Authentication, as kube-apiserver does it: client certs, bearer tokens, anonymous.

Owns :class:`UserInfo`, the ``--token-auth-file`` parser (:class:`TokenFile`), the
``--client-ca-file`` verifier (:class:`ClientCA`) and :func:`authenticate`, a pure
function of the request's ``Authorization`` header and the peer certificate.

Semantics kept from upstream (``staging/src/k8s.io/apiserver/pkg/authentication``):

- Authenticators are tried in order x509, then token; the first that recognises
  the request decides.
- Credentials that are presented but wrong (an unknown token, a cert not signed by
  the client CA, an expired cert) fail the request with 401 — they never fall back
  to anonymous.
- No credentials at all → ``system:anonymous`` in ``system:unauthenticated``
  (when anonymous auth is on). The server then answers 401 for anything but
  :data:`ANONYMOUS_PATHS`; authorization decides the rest.
- Every authenticated user also gets the group ``system:authenticated``.
- Certificate user = subject CN, groups = subject O values.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

ANONYMOUS_USER = "system:anonymous"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
AUTHENTICATED_GROUP = "system:authenticated"

# What anonymous requests may reach (upstream's system:public-info-viewer).
ANONYMOUS_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})


class AuthenticationError(KProxyError):
    """Credentials were presented and are not valid: the server answers 401."""


class TokenFileError(KProxyError):
    """A ``--token-auth-file`` that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_anonymous(self) -> bool:
        return self.name == ANONYMOUS_USER


ANONYMOUS = UserInfo(ANONYMOUS_USER, groups=(UNAUTHENTICATED_GROUP,))


def _with_authenticated(user: UserInfo) -> UserInfo:
    if AUTHENTICATED_GROUP in user.groups:
        return user
    return UserInfo(user.name, user.uid, (*user.groups, AUTHENTICATED_GROUP), user.extra)


def allows_anonymous(path: str) -> bool:
    """Whether an anonymous request for ``path`` gets past authentication."""
    return path.rstrip("/") in ANONYMOUS_PATHS or path in ANONYMOUS_PATHS


# ------------------------------------------------------------------------ tokens


class TokenFile:
    """Static bearer tokens: CSV lines ``token,user,uid[,"group1,group2"]``.

    As upstream's ``tokenfile``: blank lines are skipped, fewer than three fields is an
    error, a duplicated token is logged and the later line wins.
    """

    def __init__(self, tokens: Mapping[str, UserInfo]) -> None:
        self._tokens = dict(tokens)

    @classmethod
    def parse(cls, text: str, origin: str = "<tokens>") -> TokenFile:
        tokens: dict[str, UserInfo] = {}
        reader = csv.reader(io.StringIO(text), skipinitialspace=True)
        for lineno, record in enumerate(reader, 1):
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if len(record) < 3:
                raise TokenFileError(
                    f"{origin}:{lineno}: need at least 3 fields (token,user,uid), got {len(record)}"
                )
            token, name, uid = (f.strip() for f in record[:3])
            if not token or not name:
                raise TokenFileError(f"{origin}:{lineno}: empty token or user name")
            groups: tuple[str, ...] = ()
            if len(record) > 3 and record[3].strip():
                groups = tuple(g.strip() for g in record[3].split(",") if g.strip())
            if token in tokens:
                log.warning("%s:%d: duplicate token for %s; this line wins", origin, lineno, name)
            tokens[token] = UserInfo(name, uid, groups)
        return cls(tokens)

    @classmethod
    def load(cls, path: Path | str) -> TokenFile:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokenFileError(f"{path}: {exc}") from exc
        return cls.parse(text, str(path))

    def lookup(self, token: str) -> UserInfo | None:
        return self._tokens.get(token)

    def __len__(self) -> int:
        return len(self._tokens)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None when there is none.

    ``headers`` may be any mapping; the lookup tries the canonical spelling and the
    lower-case one (aiohttp's CIMultiDict finds either).
    """
    value = headers.get("Authorization") or headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


# ------------------------------------------------------------------- x509 client


class ClientCA:
    """The ``--client-ca-file`` bundle, and verification of client leaf certificates.

    Only leaves issued directly by one of the CAs are accepted (no intermediates:
    kproxy issues every client cert from its own CA). A leaf with an extended key
    usage must allow clientAuth, as upstream requires.
    """

    def __init__(self, cas: Iterable[x509.Certificate]) -> None:
        self._cas = list(cas)
        if not self._cas:
            raise KProxyError("client CA bundle is empty")

    @classmethod
    def load(cls, path: Path | str) -> ClientCA:
        path = Path(path)
        try:
            return cls(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise KProxyError(f"{path}: cannot load client CA bundle: {exc}") from exc

    def verify(self, leaf: x509.Certificate, now: dt.datetime | None = None) -> None:
        """Raise :class:`AuthenticationError` unless ``leaf`` is a valid client cert."""
        now = now or dt.datetime.now(dt.UTC)
        if not (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc):
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            raise AuthenticationError(
                "x509: certificate has expired or is not yet valid: current time "
                f"{now.strftime(fmt)} is outside {leaf.not_valid_before_utc.strftime(fmt)}.."
                f"{leaf.not_valid_after_utc.strftime(fmt)}"
            )
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        except ValueError as exc:
            raise AuthenticationError(f"x509: malformed certificate extension: {exc}") from exc
        if (
            eku is not None
            and ExtendedKeyUsageOID.CLIENT_AUTH not in eku
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            raise AuthenticationError("x509: certificate specifies an incompatible key usage")
        for ca in self._cas:
            if ca.subject != leaf.issuer:
                continue
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
                return
        raise AuthenticationError("x509: certificate signed by unknown authority")


def user_from_certificate(cert: x509.Certificate) -> UserInfo:
    """CN is the user, every O is a group (upstream's ``CommonNameUserConversion``)."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else ""
    if not name:
        raise AuthenticationError("x509: certificate has no common name")
    groups = tuple(
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    )
    return UserInfo(name, groups=groups)


def user_from_ssl_dict(peer: Mapping[str, Any]) -> UserInfo:
    """The user of an ``ssl.SSLSocket.getpeercert()`` dict.

    That dict only exists once the TLS layer verified the chain against the CAs the
    server context loaded, so no further check happens here.
    """
    cn = ""
    groups: list[str] = []
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and not cn:
                cn = str(value)
            elif key == "organizationName":
                groups.append(str(value))
    if not cn:
        raise AuthenticationError("x509: certificate has no common name")
    return UserInfo(cn, groups=tuple(groups))


# ---------------------------------------------------------------------- entry


PeerCert = bytes | Mapping[str, Any] | x509.Certificate | None


def authenticate(
    headers: Mapping[str, str],
    peer_cert: PeerCert = None,
    *,
    tokens: TokenFile | None = None,
    client_ca: ClientCA | None = None,
    anonymous: bool = True,
    now: dt.datetime | None = None,
) -> UserInfo:
    """Who made the request.

    ``peer_cert`` is the client's certificate: DER bytes (``getpeercert(binary_form=
    True)``, verified here against ``client_ca``), an already-verified ``getpeercert()``
    dict, or a parsed certificate (verified here). Raises :class:`AuthenticationError`
    for bad credentials, or for none at all when ``anonymous`` is off.
    """
    if peer_cert is not None and peer_cert != b"" and client_ca is not None:
        if isinstance(peer_cert, Mapping):
            if peer_cert:
                return _with_authenticated(user_from_ssl_dict(peer_cert))
        else:
            if isinstance(peer_cert, bytes):
                try:
                    cert = x509.load_der_x509_certificate(peer_cert)
                except ValueError as exc:
                    raise AuthenticationError(f"x509: malformed certificate: {exc}") from exc
            else:
                cert = peer_cert
            client_ca.verify(cert, now)
            return _with_authenticated(user_from_certificate(cert))

    token = bearer_token(headers)
    if token is not None:
        user = tokens.lookup(token) if tokens is not None else None
        if user is None:
            raise AuthenticationError("invalid bearer token")
        return _with_authenticated(user)

    if not anonymous:
        raise AuthenticationError("no credentials presented and anonymous auth is off")
    return ANONYMOUS
