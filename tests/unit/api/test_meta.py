"""ObjectMeta helpers: name syntaxes, generateName and create stamps (pure)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from kproxy.api import meta


def test_name_syntaxes() -> None:
    assert meta.is_dns1123_label("web-1") == []
    assert meta.is_dns1123_label("Web")
    assert meta.is_dns1123_label("a" * 64) == ["must be no more than 63 characters"]
    assert meta.is_dns1123_subdomain("a.b-c.d") == []
    assert meta.is_dns1035_label("1web")
    assert meta.is_qualified_name("kubernetes.io/service-name") == []
    assert meta.is_qualified_name("/x") == ["prefix part must be non-empty"]
    assert meta.is_valid_label_value("") == []
    assert meta.name_rule("Service") is meta.is_dns1035_label
    assert meta.name_rule("Pod") is meta.is_dns1123_subdomain


def test_generate_name_and_stamp() -> None:
    picks = itertools.cycle("bcd")
    assert meta.generate_name("web-", lambda alphabet: next(picks)) == "web-bcdbc"
    assert len(meta.generate_name("x" * 100, lambda a: a[0])) == 63
    obj = {"metadata": {"generateName": "web-", "resourceVersion": "5"}}
    now = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    meta.stamp_create(obj, now=now, new_uid=lambda: "uid-1", choose=lambda a: "z")
    assert obj["metadata"] == {
        "generateName": "web-",
        "name": "web-zzzzz",
        "uid": "uid-1",
        "creationTimestamp": "2024-05-01T12:00:00Z",
        "generation": 1,
    }
    assert meta.format_micro_time(now) == "2024-05-01T12:00:00.123456Z"
    assert meta.parse_time("2024-05-01T12:00:00Z") == now.replace(microsecond=0)


def test_annotations_size_limit() -> None:
    errs = meta.validate_annotations({"a": "x" * (256 * 1024)}, "metadata.annotations")
    assert [e.type.reason for e in errs] == ["FieldValueTooLong"]
