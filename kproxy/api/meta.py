"""ObjectMeta: name rules, label/annotation syntax, generateName and create stamps.

Owns the string syntaxes of ``k8s.io/apimachinery/pkg/util/validation`` (DNS-1123
label and subdomain, DNS-1035 label, qualified names, label values) with upstream's
messages, the per-kind name rule, ObjectMeta validation, and the pure helpers the
apiserver uses to stamp new objects (uid, creationTimestamp, generated names).

Invariants: validators return lists of :class:`FieldError` (never raise); the
stamping helpers take the clock and the id/random source as arguments, so they are
deterministic under test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kproxy.api.errors import FieldError

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
QUALIFIED_NAME_MAX = 63
LABEL_VALUE_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + r")*"
_DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = r"(" + _QUALIFIED_NAME + r")?"

_RE_DNS1123_LABEL = re.compile(_DNS1123_LABEL)
_RE_DNS1123_SUBDOMAIN = re.compile(_DNS1123_SUBDOMAIN)
_RE_DNS1035_LABEL = re.compile(_DNS1035_LABEL)
_RE_QUALIFIED_NAME = re.compile(_QUALIFIED_NAME)
_RE_LABEL_VALUE = re.compile(_LABEL_VALUE)


def _regex_error(msg: str, regex: str, *examples: str) -> str:
    # upstream's RegexError: examples joined by ",  or " (sic, two spaces).
    ex = ",  or ".join(f"'{e}'" for e in examples)
    return f"{msg} (e.g. {ex}, regex used for validation is '{regex}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


def is_dns1123_label(value: str) -> list[str]:
    errs = []
    if len(value) > DNS1123_LABEL_MAX:
        errs.append(_max_len(DNS1123_LABEL_MAX))
    if not _RE_DNS1123_LABEL.fullmatch(value):
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                "or '-', and must start and end with an alphanumeric character",
                _DNS1123_LABEL,
                "my-name",
                "123-abc",
            )
        )
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value) > DNS1123_SUBDOMAIN_MAX:
        errs.append(_max_len(DNS1123_SUBDOMAIN_MAX))
    if not _RE_DNS1123_SUBDOMAIN.fullmatch(value):
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
                _DNS1123_SUBDOMAIN,
                "example.com",
            )
        )
    return errs


def is_dns1035_label(value: str) -> list[str]:
    errs = []
    if len(value) > DNS1123_LABEL_MAX:
        errs.append(_max_len(DNS1123_LABEL_MAX))
    if not _RE_DNS1035_LABEL.fullmatch(value):
        errs.append(
            _regex_error(
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
                "start with an alphabetic character, and end with an alphanumeric character",
                _DNS1035_LABEL,
                "my-name",
                "abc-123",
            )
        )
    return errs


def is_qualified_name(value: str) -> list[str]:
    """``[prefix/]name`` as label and annotation keys use (``IsQualifiedName``)."""
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            _regex_error(
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character",
                _QUALIFIED_NAME,
                "MyName",
                "my.name",
                "123-abc",
            )
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > QUALIFIED_NAME_MAX:
        errs.append("name part " + _max_len(QUALIFIED_NAME_MAX))
    if name and not _RE_QUALIFIED_NAME.fullmatch(name):
        errs.append(
            "name part "
            + _regex_error(
                "must consist of alphanumeric characters, '-', '_' or '.', and must start and "
                "end with an alphanumeric character",
                _QUALIFIED_NAME,
                "MyName",
                "my.name",
                "123-abc",
            )
        )
    return errs


def is_valid_label_value(value: str) -> list[str]:
    errs = []
    if len(value) > LABEL_VALUE_MAX:
        errs.append(_max_len(LABEL_VALUE_MAX))
    if not _RE_LABEL_VALUE.fullmatch(value):
        errs.append(
            _regex_error(
                "a valid label must be an empty string or consist of alphanumeric characters, "
                "'-', '_' or '.', and must start and end with an alphanumeric character",
                _LABEL_VALUE,
                "MyValue",
                "my_value",
                "12345",
            )
        )
    return errs


# Name rules per kind, as each kind's upstream Validate<Kind>Name.
NameRule = Callable[[str], list[str]]
NAME_RULES: dict[str, NameRule] = {
    "Namespace": is_dns1123_label,
    "Service": is_dns1035_label,
}


def name_rule(kind: str) -> NameRule:
    return NAME_RULES.get(kind, is_dns1123_subdomain)


def _mask_trailing_dash(name: str) -> str:
    # A generateName prefix may end in "-": validate it as if it ended in "a".
    return name[:-1] + "a" if len(name) > 1 and name.endswith("-") else name


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    if labels is None:
        return []
    if not isinstance(labels, Mapping):
        return [FieldError.invalid(path, labels, "must be a map of string to string")]
    errs: list[FieldError] = []
    for key, value in labels.items():
        for msg in is_qualified_name(str(key)):
            errs.append(FieldError.invalid(path, key, msg))
        if not isinstance(value, str):
            errs.append(FieldError.invalid(f"{path}[{key}]", value, "must be a string"))
            continue
        for msg in is_valid_label_value(value):
            errs.append(FieldError.invalid(f"{path}[{key}]", value, msg))
    return errs


def validate_annotations(annotations: Any, path: str) -> list[FieldError]:
    if annotations is None:
        return []
    if not isinstance(annotations, Mapping):
        return [FieldError.invalid(path, annotations, "must be a map of string to string")]
    errs: list[FieldError] = []
    total = 0
    for key, value in annotations.items():
        for msg in is_qualified_name(str(key).lower()):
            errs.append(FieldError.invalid(path, key, msg))
        if not isinstance(value, str):
            errs.append(FieldError.invalid(f"{path}[{key}]", value, "must be a string"))
            continue
        total += len(str(key)) + len(value)
    if total > ANNOTATIONS_MAX_BYTES:
        errs.append(FieldError.too_long(path, ANNOTATIONS_MAX_BYTES))
    return errs


def _validate_owner_references(refs: Any, path: str) -> list[FieldError]:
    if refs is None:
        return []
    if not isinstance(refs, list):
        return [FieldError.invalid(path, refs, "must be a list")]
    errs: list[FieldError] = []
    controllers = 0
    for i, ref in enumerate(refs):
        p = f"{path}[{i}]"
        if not isinstance(ref, Mapping):
            errs.append(FieldError.invalid(p, ref, "must be an object"))
            continue
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                errs.append(FieldError.invalid(f"{p}.{key}", ref.get(key, ""), "must not be empty"))
        if ref.get("controller") is True:
            controllers += 1
    if controllers > 1:
        errs.append(
            FieldError.invalid(path, refs, "Only one reference can have Controller set to true.")
        )
    return errs


def validate_object_meta(
    meta: Any, *, kind: str, namespaced: bool, path: str = "metadata"
) -> list[FieldError]:
    """Upstream ``ValidateObjectMeta`` for a create (names, namespace, labels, owners)."""
    if not isinstance(meta, Mapping):
        return [FieldError.required(path)]
    errs: list[FieldError] = []
    rule = name_rule(kind)
    name = meta.get("name") or ""
    generate = meta.get("generateName") or ""
    if not isinstance(name, str) or not isinstance(generate, str):
        errs.append(FieldError.invalid(f"{path}.name", name, "must be a string"))
        return errs
    if generate:
        for msg in rule(_mask_trailing_dash(generate)):
            errs.append(FieldError.invalid(f"{path}.generateName", generate, msg))
    if not name:
        if not generate:
            errs.append(FieldError.required(f"{path}.name", "name or generateName is required"))
    else:
        for msg in rule(name):
            errs.append(FieldError.invalid(f"{path}.name", name, msg))
    namespace = meta.get("namespace") or ""
    if namespaced:
        if not namespace:
            errs.append(FieldError.required(f"{path}.namespace"))
        elif not isinstance(namespace, str):
            errs.append(FieldError.invalid(f"{path}.namespace", namespace, "must be a string"))
        else:
            for msg in is_dns1123_label(namespace):
                errs.append(FieldError.invalid(f"{path}.namespace", namespace, msg))
    elif namespace:
        errs.append(FieldError.forbidden(f"{path}.namespace", "not allowed on this type"))
    errs.extend(validate_labels(meta.get("labels"), f"{path}.labels"))
    errs.extend(validate_annotations(meta.get("annotations"), f"{path}.annotations"))
    errs.extend(_validate_owner_references(meta.get("ownerReferences"), f"{path}.ownerReferences"))
    finalizers = meta.get("finalizers")
    if finalizers is not None:
        if not isinstance(finalizers, list):
            errs.append(FieldError.invalid(f"{path}.finalizers", finalizers, "must be a list"))
        else:
            for i, fin in enumerate(finalizers):
                for msg in is_qualified_name(str(fin)):
                    errs.append(FieldError.invalid(f"{path}.finalizers[{i}]", fin, msg))
    return errs


# ------------------------------------------------------------------- stamping

# names.SimpleNameGenerator: 5 characters from an alphabet without vowels and
# look-alikes, appended to a prefix cut to leave room for them.
GENERATED_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
GENERATED_SUFFIX_LEN = 5
MAX_GENERATED_PREFIX = DNS1123_LABEL_MAX - GENERATED_SUFFIX_LEN


def generate_name(prefix: str, choose: Callable[[str], str]) -> str:
    """``prefix`` + 5 characters picked by ``choose`` (e.g. ``random.choice``)."""
    base = prefix[:MAX_GENERATED_PREFIX]
    return base + "".join(choose(GENERATED_SUFFIX_ALPHABET) for _ in range(GENERATED_SUFFIX_LEN))


def format_time(when: datetime) -> str:
    """``metav1.Time``: RFC 3339 in UTC with whole seconds (``2024-05-01T12:00:00Z``)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(when: datetime) -> str:
    """``metav1.MicroTime`` (Lease, events.k8s.io): six fractional digits."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse ``metav1.Time``/``MicroTime`` text (a trailing ``Z`` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def stamp_create(
    obj: dict[str, Any],
    *,
    now: datetime,
    new_uid: Callable[[], str],
    choose: Callable[[str], str],
) -> dict[str, Any]:
    """Fill the server-owned metadata of an object being created (in place; returned).

    Sets the name from ``generateName`` when absent, a fresh ``uid``, the
    ``creationTimestamp``, and ``generation`` 1; drops what a client may not set on
    create (``deletionTimestamp``, ``deletionGracePeriodSeconds``, ``resourceVersion``,
    ``selfLink``).
    """
    meta = obj.setdefault("metadata", {})
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = generate_name(meta["generateName"], choose)
    meta["uid"] = new_uid()
    meta["creationTimestamp"] = format_time(now)
    meta["generation"] = 1
    for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink"):
        meta.pop(key, None)
    return obj
