"""The admin API's input, field by field: `metadata` nested or sized past what can be stored sanely,
limits of hundreds of digits, a usage range that ends before it starts, a key's expiry that has
already passed, are each a 400 naming the field, with nothing stored; and a time without an offset
means the same instant on every machine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.api import admin_keys
from gateway.errors import InvalidRequest
from tests.helpers import GatewayProcess, all_keys, error_of, free_port

# Nothing listens there: these tests stay in the admin API.
BACKENDS = [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m1"]}]
# Five hours behind UTC all year, and needs no tz database: read as local time, a naive
# "2030-01-01T00:00:00" would be 05:00Z.
NOT_UTC = "EST5"
MAX_LIMIT = 2**31 - 1


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway on the embedded store, in a time zone that is not UTC."""
    process = GatewayProcess({"backends": BACKENDS}, tmp_path_factory.mktemp("admin_input"), env={"TZ": NOT_UTC})
    try:
        yield process.wait_healthy(60, ready=False)
    finally:
        process.stop()


def nested(levels: int, inner: Any = "x") -> Any:
    for _ in range(levels):
        inner = [inner]
    return inner


def nested_text(levels: int) -> str:
    """`nested` as JSON text: json.dumps itself gives up near 1000 levels."""
    return "[" * levels + '"x"' + "]" * levels


def objects(levels: int) -> dict[str, Any]:
    """{"a": {"a": ... {"a": 1}}}, `levels` objects deep counting the outermost."""
    inner: dict[str, Any] = {"a": 1}
    for _ in range(levels - 1):
        inner = {"a": inner}
    return inner


def refused_on_create_and_update(gateway: GatewayProcess, field: str, value: str, param: str) -> None:
    """`value` is JSON text, so it may be nested deeper than the json module encodes."""
    before = all_keys(gateway)
    error = error_of(gateway.admin("POST", "/admin/keys", content=f'{{"name": "refused", "{field}": {value}}}'), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert all_keys(gateway) == before
    created = gateway.admin("POST", "/admin/keys", json={"name": "kept", "metadata": {"team": "a"}, "rpm": 7})
    assert created.status_code == 201, created.text
    key_id = created.json()["id"]
    error = error_of(gateway.admin("PATCH", f"/admin/keys/{key_id}", content=f'{{"{field}": {value}}}'), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    shown = gateway.admin("GET", f"/admin/keys/{key_id}").json()
    assert (shown["metadata"], shown["rpm"], shown["tpm"], shown["max_concurrency"]) == ({"team": "a"}, 7, None, None)


@pytest.mark.parametrize("metadata", [
    '{"a": %s}' % nested_text(300),  # stored by the old code, and then carried in every listing
    '{"a": %s}' % nested_text(950),  # the old code: 500 internal_error, a RecursionError in the log
    '{"a": %s}' % nested_text(500),
    '{"a": %s}' % nested_text(16),  # one level past the bound: the object itself is level 1
    json.dumps(objects(17)),
    json.dumps({"blob": "x" * (16 * 1024)}),
    json.dumps({f"k{i}": "v" * 100 for i in range(200)}),
], ids=["300 deep", "950 deep", "500 deep", "17 deep", "17 objects deep", "16 KiB and more", "200 pairs"])
def test_metadata_past_its_bounds_is_refused_before_storing(gateway: GatewayProcess, metadata: str) -> None:
    refused_on_create_and_update(gateway, "metadata", metadata, "metadata")
    assert "RecursionError" not in gateway.log()


@pytest.mark.parametrize("metadata", [
    {"team": "x"},  # as README's users, the CLI and quickstart store it
    {"created_by": "make run"},
    {"a": nested(15)},  # the deepest there may be
    objects(16),
    {"owner": {"name": "ann", "ids": [1, 2.5, True, None]}, "tags": ["a", "b"]},
    {"blob": "x" * (16 * 1024 - len('{"blob":""}'))},  # exactly 16 KiB as compact JSON
])
def test_metadata_within_its_bounds_is_kept(gateway: GatewayProcess, metadata: dict[str, Any]) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "labelled", "metadata": metadata})
    assert created.status_code == 201 and created.json()["metadata"] == metadata, created.text
    plain = gateway.admin("POST", "/admin/keys", json={"name": "plain"}).json()
    patched = gateway.admin("PATCH", f"/admin/keys/{plain['id']}", json={"metadata": metadata})
    assert patched.status_code == 200, patched.text
    for key_id in (created.json()["id"], plain["id"]):
        assert gateway.admin("GET", f"/admin/keys/{key_id}").json()["metadata"] == metadata


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency"])
@pytest.mark.parametrize("value", [MAX_LIMIT + 1, 10**500, 0], ids=["2**31", "500 digits", "0"])
def test_limits_out_of_range_are_refused_before_storing(gateway: GatewayProcess, field: str, value: int) -> None:
    refused_on_create_and_update(gateway, field, str(value), field)


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency"])
def test_the_largest_limit_is_kept(gateway: GatewayProcess, field: str) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "big", field: MAX_LIMIT})
    assert created.status_code == 201 and created.json()[field] == MAX_LIMIT, created.text
    patched = gateway.admin("PATCH", f"/admin/keys/{created.json()['id']}", json={field: None})
    assert patched.status_code == 200 and patched.json()[field] is None, patched.text


@pytest.mark.parametrize(("query", "param"), [
    ({"start": "2026-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}, "end"),
    ({"start": "1767225600", "end": "1767225599"}, "end"),  # a second before, in unix seconds
    ({"end": "2020-01-01T00:00:00Z"}, "end"),  # before the default start, 24 hours ago
    ({"start": "9000-01-01T00:00:00Z"}, "start"),  # after the default end, an hour from now
])
def test_usage_ending_before_it_starts_is_refused(gateway: GatewayProcess, query: dict[str, str], param: str) -> None:
    error = error_of(gateway.admin("GET", "/admin/usage", params=query), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert "before `start`" in error["message"]


def test_usage_over_an_empty_range_is_still_an_answer(gateway: GatewayProcess) -> None:
    r = gateway.admin("GET", "/admin/usage", params={"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"})
    assert r.status_code == 200 and r.json()["data"] == [], r.text


@pytest.mark.parametrize(("given", "shown"), [
    ("2030-01-01T00:00:00", "2030-01-01T00:00:00Z"),
    ("2030-01-01", "2030-01-01T00:00:00Z"),
    ("2030-01-01T00:00:00Z", "2030-01-01T00:00:00Z"),
    ("2030-01-01T00:00:00+02:00", "2029-12-31T22:00:00Z"),  # an offset given is still honoured
])
def test_an_expiry_without_an_offset_is_utc(gateway: GatewayProcess, given: str, shown: str) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "expiring", "expires_at": given})
    assert created.status_code == 201 and created.json()["expires_at"] == shown, created.text
    patched = gateway.admin("PATCH", f"/admin/keys/{created.json()['id']}", json={"expires_at": given})
    assert patched.status_code == 200 and patched.json()["expires_at"] == shown, patched.text


def refused_with(response: Any, param: str, words: str) -> None:
    error = error_of(response, 400)
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", None), error
    assert words in error["message"], error


@pytest.mark.parametrize("expires_at", [
    "2020-01-01T00:00:00Z",
    "1970-01-01",  # the earliest time there is: in range, and long past
    "2000-01-01T00:00:00+02:00",
    1700000000,  # unix seconds: November 2023
    0,
], ids=["RFC 3339", "a date", "an offset", "unix seconds", "0"])
def test_an_expiry_in_the_past_is_refused_before_storing(gateway: GatewayProcess, expires_at: str | int) -> None:
    before = all_keys(gateway)
    refused_with(gateway.admin("POST", "/admin/keys", json={"name": "expired-already", "expires_at": expires_at}),
                 "expires_at", "is in the past")
    assert all_keys(gateway) == before  # no key was issued whose secret could never be used
    kept = gateway.admin("POST", "/admin/keys", json={"name": "kept", "expires_in": "1d"}).json()
    refused_with(gateway.admin("PATCH", f"/admin/keys/{kept['id']}", json={"expires_at": expires_at}),
                 "expires_at", "is in the past")
    shown = gateway.admin("GET", f"/admin/keys/{kept['id']}").json()
    assert (shown["expires_at"], shown["status"]) == (kept["expires_at"], "active")


def test_an_expiry_that_has_just_passed_is_refused_and_one_to_come_is_kept(gateway: GatewayProcess) -> None:
    refused_with(gateway.admin("POST", "/admin/keys", json={"name": "a", "expires_at": time.time() - 1}),
                 "expires_at", "is in the past")
    created = gateway.admin("POST", "/admin/keys", json={"name": "a", "expires_at": time.time() + 60})
    assert created.status_code == 201 and created.json()["status"] == "active", created.text
    patched = gateway.admin("PATCH", f"/admin/keys/{created.json()['id']}", json={"expires_at": time.time() + 120})
    assert patched.status_code == 200 and patched.json()["status"] == "active", patched.text
    lifted = gateway.admin("PATCH", f"/admin/keys/{created.json()['id']}", json={"expires_at": None})
    assert lifted.status_code == 200 and lifted.json()["expires_at"] is None, lifted.text


@pytest.mark.parametrize("expires_in", [0, "0", "0s", "0.0d"], ids=["0", "'0'", "'0s'", "'0.0d'"])
def test_an_expiry_of_no_time_at_all_is_refused(gateway: GatewayProcess, expires_in: str | int) -> None:
    # Expired the moment it is stored, as an expiry in the past.
    refused_with(gateway.admin("POST", "/admin/keys", json={"name": "a", "expires_in": expires_in}),
                 "expires_in", "more than 0 seconds")
    kept = gateway.admin("POST", "/admin/keys", json={"name": "kept"}).json()
    refused_with(gateway.admin("PATCH", f"/admin/keys/{kept['id']}", json={"expires_in": expires_in}),
                 "expires_in", "more than 0 seconds")
    assert gateway.admin("GET", f"/admin/keys/{kept['id']}").json()["expires_at"] is None


def test_usage_times_without_an_offset_are_utc(gateway: GatewayProcess) -> None:
    r = gateway.admin("GET", "/admin/usage", params={"start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00"})
    assert r.status_code == 200, r.text
    assert (r.json()["start"], r.json()["end"]) == ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", NOT_UTC)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()  # this process's own zone again, for the tests after


@pytest.mark.usefixtures("local_time_not_utc")
def test_reading_a_time_does_not_depend_on_the_machines_zone() -> None:
    assert time.timezone == 5 * 3600  # the zone took: local time is not UTC here
    assert admin_keys._timestamp("2030-01-01T00:00:00", "expires_at") == 1893456000.0
    assert admin_keys._timestamp("2030-01-01", "expires_at") == 1893456000.0
    assert admin_keys._timestamp("1970-01-01T00:00:00", "start") == 0.0  # local: 5 hours in
    with pytest.raises(InvalidRequest) as refused:
        admin_keys._timestamp("1969-12-31T23:59:59", "start")  # local: after the epoch
    assert refused.value.param == "start"
