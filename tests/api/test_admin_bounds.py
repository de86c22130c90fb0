"""The admin API's bounds: a duration or time no answer could show is a 400 naming its field, refused
before anything is stored; a key stored with one (by an older gateway) still lists; and a key
store that is away answers 503 with retry-after, not 500."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio

from gateway import keys
from gateway.store.base import ApiKey
from gateway.store.redis import RedisStore
from tests.conftest import RedisServer, StartGateway
from tests.helpers import GatewayProcess, all_keys, error_of, free_port

# Nothing listens there: these tests stay in the admin API.
BACKENDS = [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m1"]}]
LATEST = "9999-12-31T23:59:59Z"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway on the embedded store for every refusal below: none of them may store anything."""
    process = GatewayProcess({"backends": BACKENDS}, tmp_path_factory.mktemp("admin_bounds"))
    try:
        yield process.wait_healthy(60, ready=False)
    finally:
        process.stop()


@pytest.mark.parametrize(("body", "param"), [
    ({"expires_in": "999999999d"}, "expires_in"),
    ({"expires_in": "36501d"}, "expires_in"),  # just over a century
    ({"expires_in": 1e20}, "expires_in"),
    ({"expires_in": 10 ** 400}, "expires_in"),  # valid JSON, too large for a float
    ({"expires_in": "9" * 400}, "expires_in"),  # float() of it is inf
    ({"expires_at": 1e20}, "expires_at"),
    ({"expires_at": 253402300800}, "expires_at"),  # 10000-01-01
    ({"expires_at": -1e20}, "expires_at"),
    ({"expires_at": "0001-01-01T00:00:00Z"}, "expires_at"),
])
def test_out_of_range_expiry_is_refused_before_storing(gateway: GatewayProcess, body: dict[str, Any],
                                                       param: str) -> None:
    before = all_keys(gateway)
    error = error_of(gateway.admin("POST", "/admin/keys", json={"name": "typo", **body}), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert all_keys(gateway) == before
    key_id = gateway.admin("POST", "/admin/keys", json={"name": "fine"}).json()["id"]
    error = error_of(gateway.admin("PATCH", f"/admin/keys/{key_id}", json=body), 400)
    assert error["param"] == param
    assert gateway.admin("GET", f"/admin/keys/{key_id}").json()["expires_at"] is None


def test_the_bounds_themselves_are_accepted(gateway: GatewayProcess) -> None:
    century = gateway.admin("POST", "/admin/keys", json={"name": "long", "expires_in": "36500d"})
    assert century.status_code == 201, century.text
    assert century.json()["expires_at"] > f"{time.gmtime().tm_year + 99}"
    last = gateway.admin("POST", "/admin/keys", json={"name": "last", "expires_at": LATEST})
    assert last.status_code == 201 and last.json()["expires_at"] == LATEST, last.text


@pytest.mark.parametrize("grace", [1e20, "999999999d", 10 ** 400])
def test_rotation_with_a_grace_beyond_a_century_changes_nothing(gateway: GatewayProcess, grace: Any) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "rotating"}).json()
    error = error_of(gateway.admin("POST", f"/admin/keys/{created['id']}/rotate", json={"grace_period": grace}), 400)
    assert error["param"] == "grace_period"
    shown = gateway.admin("GET", f"/admin/keys/{created['id']}")
    assert shown.status_code == 200 and shown.json()["prefix"] == created["prefix"], shown.text
    models = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {created['key']}"})
    assert models.status_code == 200  # still the one secret, not rotated


@pytest.mark.parametrize(("query", "param"), [
    ({"start": "nan"}, "start"),
    ({"end": "inf"}, "end"),
    ({"end": "-inf"}, "end"),
    ({"start": "1e20"}, "start"),
    ({"start": "-1"}, "start"),
    ({"end": "1e400"}, "end"),
    ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
])
def test_usage_times_out_of_range_are_refused(gateway: GatewayProcess, query: dict[str, str], param: str) -> None:
    error = error_of(gateway.admin("GET", "/admin/usage", params=query), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error


@pytest.mark.parametrize("absurd", [1e20, -1e20, math.inf, math.nan, 253402300799.9])
def test_any_stored_time_renders(absurd: float) -> None:
    shown = keys.iso(absurd)
    assert shown in (LATEST, "1970-01-01T00:00:00Z")
    key = ApiKey(id="key_x", name="x", hash="h", prefix="sk-gw-x", created_at=absurd, updated_at=absurd,
                 expires_at=absurd, revoked_at=absurd, previous_expires_at=absurd)
    assert keys.public(key, last_used=absurd)["expires_at"] == shown


def test_a_key_stored_with_an_absurd_expiry_still_lists(start_gateway: StartGateway, redis_url: str) -> None:
    """As an older gateway stored `expires_in: "999999999d"` and `grace_period: 1e20`."""
    now = time.time()
    stored = ApiKey(id="key_absurd", name="absurd", hash="0" * 64, prefix="sk-gw-absurd", created_at=now,
                    updated_at=now, expires_at=now + 999999999 * 86400, previous_hash="1" * 64,
                    previous_expires_at=1e20)

    async def store() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        await RedisStore(client).create_key(stored)
        await client.aclose()

    asyncio.run(store())
    gateway = start_gateway({"backends": BACKENDS, "store": {"url": redis_url}}, ready=False)
    listed = all_keys(gateway)
    assert [(k["id"], k["expires_at"], k["previous_key_expires_at"]) for k in listed] == [
        ("key_absurd", LATEST, LATEST)]
    assert all_keys(gateway) == listed  # and again: listing never fails for ever
    named = gateway.admin("GET", "/admin/keys", params={"name": "abs"})
    assert named.status_code == 200 and named.json()["total"] == 1
    assert gateway.admin("GET", "/admin/keys/key_absurd").json()["expires_at"] == LATEST


def test_admin_answers_503_with_retry_after_while_redis_is_away(
        start_gateway: StartGateway, redis_url: str, redis_server: RedisServer) -> None:
    gateway = start_gateway({"backends": BACKENDS, "store": {"url": redis_url}}, ready=False)
    key_id = gateway.admin("POST", "/admin/keys", json={"name": "before"}).json()["id"]
    redis_server.kill()  # the redis_url fixture starts it again for the next test
    for method, path, body in [("GET", "/admin/keys", None), ("POST", "/admin/keys", {"name": "during"}),
                               ("GET", f"/admin/keys/{key_id}", None), ("DELETE", f"/admin/keys/{key_id}", None),
                               ("GET", "/admin/usage", None)]:
        r = gateway.admin(method, path, json=body)
        error = error_of(r, 503)
        assert (error["type"], error["code"]) == ("server_error", "backend_unavailable"), error
        assert int(r.headers["retry-after"]) >= 1
