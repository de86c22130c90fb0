"""API keys end to end, on the embedded store and on Redis: the admin API, what a key may do,
revocation across replicas, restarts, and that the plaintext is never kept."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import StartGateway
from tests.helpers import ADMIN_KEY, GatewayProcess, error_of, free_port, wait_until


def _config(store: str, redis_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        # Nothing listens there: these tests stop at auth and routing, before any backend.
        "backends": [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                      "serves": ["m1", "m2"]}],
        "models": {"aliases": {"m1-alias": "m1"}},
    }
    if store == "redis":
        config["store"] = {"url": redis_url}
    return config


@pytest.fixture(params=["sqlite", "redis"])
def store_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return _config(request.param, redis_url)


@pytest.fixture
def gateway(start_gateway: StartGateway, store_config: dict[str, Any]) -> GatewayProcess:
    return start_gateway(store_config, ready=False)


def models_for(gateway: GatewayProcess, key: str) -> httpx.Response:
    return httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})


def test_admin_routes_take_only_the_admin_key(gateway: GatewayProcess) -> None:
    api_key = gateway.new_key()
    for headers in ({}, {"authorization": f"Bearer {api_key}"}, {"authorization": "Bearer wrong"}):
        r = httpx.get(gateway.url + "/admin/keys", headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"


def test_v1_needs_a_valid_key(gateway: GatewayProcess) -> None:
    assert error_of(httpx.get(gateway.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert error_of(models_for(gateway, "sk-gw-not-a-key"), 401)["code"] == "invalid_api_key"
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "m1", "messages": []},
                   headers={"authorization": "Basic abc"})
    assert error_of(r, 401)["code"] == "invalid_api_key"


def test_create_shows_the_secret_once(gateway: GatewayProcess) -> None:
    r = gateway.admin("POST", "/admin/keys", json={"name": "alice", "models": ["m1"], "rpm": 60, "tpm": 1000,
                                                   "max_concurrency": 2, "priority": 5, "metadata": {"team": "x"}})
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["key"]
    assert secret.startswith("sk-gw-") and len(secret) >= 40
    assert created["prefix"] == secret[:12] and created["status"] == "active"
    assert (created["models"], created["rpm"], created["priority"]) == (["m1"], 60, 5)
    shown = gateway.admin("GET", f"/admin/keys/{created['id']}").json()
    listed = gateway.admin("GET", "/admin/keys").json()["data"]
    for view in (shown, *listed):
        assert "key" not in view and "hash" not in view and secret not in str(view)
    assert models_for(gateway, secret).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"name": "a", "colour": "red"}, "colour"),
    ({"name": "a", "rpm": "fast"}, "rpm"),
    ({"name": "a", "rpm": 0}, "rpm"),
    ({"name": "a", "models": "m1"}, "models"),
    ({"name": "a", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "a", "expires_in": 60, "expires_at": 1}, "expires_in"),
    ({"models": ["m1"]}, "name"),
])
def test_create_validation_names_the_field(gateway: GatewayProcess, body: dict[str, Any], param: str) -> None:
    error = error_of(gateway.admin("POST", "/admin/keys", json=body), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_list_filters_and_paginates(gateway: GatewayProcess) -> None:
    ids = [gateway.admin("POST", "/admin/keys", json={"name": f"team-{i}"}).json()["id"] for i in range(5)]
    gateway.admin("DELETE", f"/admin/keys/{ids[0]}")
    page = gateway.admin("GET", "/admin/keys", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and page["has_more"] is True
    assert [k["id"] for k in page["data"]] == ids[2:4]
    revoked = gateway.admin("GET", "/admin/keys", params={"status": "revoked"}).json()["data"]
    assert [k["id"] for k in revoked] == [ids[0]]
    named = gateway.admin("GET", "/admin/keys", params={"name": "TEAM-3", "status": "all"}).json()["data"]
    assert [k["id"] for k in named] == [ids[3]]
    assert error_of(gateway.admin("GET", "/admin/keys", params={"limit": 0}), 400)["param"] == "limit"


def test_update_applies_at_once_and_validates(gateway: GatewayProcess) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "a", "models": ["m1"]}).json()
    secret, key_id = created["key"], created["id"]
    assert [m["id"] for m in models_for(gateway, secret).json()["data"]] == ["m1", "m1-alias"]
    r = gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"models": ["m2"], "rpm": None, "name": "b"})
    assert r.status_code == 200 and r.json()["models"] == ["m2"] and r.json()["name"] == "b"
    assert wait_until(lambda: [m["id"] for m in models_for(gateway, secret).json()["data"]] == ["m2"], 1.0)
    assert error_of(gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"rpm": -1}), 400)["param"] == "rpm"
    assert error_of(gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"id": "x"}), 400)["param"] == "id"
    assert error_of(gateway.admin("PATCH", "/admin/keys/key_nope", json={}), 404)["code"] == "key_not_found"


def test_revoke_refuses_the_key(gateway: GatewayProcess) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "a"}).json()
    assert models_for(gateway, created["key"]).status_code == 200
    r = gateway.admin("DELETE", f"/admin/keys/{created['id']}")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    # Refused from the answer on, on the replica that answered (others: within a second, below).
    assert error_of(models_for(gateway, created["key"]), 401)["code"] == "invalid_api_key"
    assert error_of(gateway.admin("POST", f"/admin/keys/{created['id']}/rotate", json={}), 400)["code"] == "key_revoked"


def test_rotate_with_and_without_grace(gateway: GatewayProcess) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "a", "rpm": 7}).json()
    old = created["key"]
    r = gateway.admin("POST", f"/admin/keys/{created['id']}/rotate", json={"grace_period": "2s"})
    rotated = r.json()
    assert r.status_code == 200 and rotated["id"] == created["id"] and rotated["rpm"] == 7
    new = rotated["key"]
    assert new != old
    assert models_for(gateway, new).status_code == 200  # at once, on the replica that answered
    assert models_for(gateway, old).status_code == 200  # within the grace period
    assert wait_until(lambda: models_for(gateway, old).status_code == 401, 5.0)
    again = gateway.admin("POST", f"/admin/keys/{created['id']}/rotate").json()["key"]
    assert wait_until(lambda: models_for(gateway, new).status_code == 401, 1.0)  # no grace: at once
    assert models_for(gateway, again).status_code == 200


async def test_a_revocation_answered_200_stays_under_concurrent_updates(start_gateway: StartGateway,
                                                                        store_config: dict[str, Any]) -> None:
    one = start_gateway(store_config, ready=False)
    # On Redis the update goes to another replica, as behind a load balancer.
    two = start_gateway(store_config, ready=False) if "store" in store_config else one
    created = [one.admin("POST", "/admin/keys", json={"name": f"race{i}"}).json() for i in range(30)]
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:

        async def race(key_id: str) -> httpx.Response:
            revoked, _ = await asyncio.gather(client.delete(f"{one.url}/admin/keys/{key_id}"),
                                              client.patch(f"{two.url}/admin/keys/{key_id}", json={"rpm": 77}))
            return revoked

        answers = await asyncio.gather(*(race(c["id"]) for c in created))
    assert [r.status_code for r in answers] == [200] * len(created)
    shown = {k["id"]: k["status"] for k in one.admin("GET", "/admin/keys", params={"status": "all"}).json()["data"]}
    assert [shown[c["id"]] for c in created] == ["revoked"] * len(created)
    for c in created:  # on the other replica too (within the second its change feed may take)
        assert wait_until(lambda: models_for(two, c["key"]).status_code == 401, 1.0)


def test_expired_key_is_refused(gateway: GatewayProcess) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "a", "expires_in": 1}).json()
    assert models_for(gateway, created["key"]).status_code == 200
    assert wait_until(lambda: models_for(gateway, created["key"]).status_code == 401, 3.0)
    assert gateway.admin("GET", f"/admin/keys/{created['id']}").json()["status"] == "expired"


def test_model_outside_the_key_looks_like_no_model(gateway: GatewayProcess) -> None:
    key = gateway.new_key(models=["m1"])
    headers = {"authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    hidden = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "model": "m2"}, headers=headers)
    absent = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "model": "m3"}, headers=headers)
    assert error_of(hidden, 404)["code"] == error_of(absent, 404)["code"] == "model_not_found"
    assert hidden.json()["error"]["message"].replace("m2", "X") == absent.json()["error"]["message"].replace("m3", "X")
    assert error_of(httpx.get(gateway.url + "/v1/models/m2", headers=headers), 404)["code"] == "model_not_found"
    # the served name's alias is allowed; a key listing only the alias gets only the alias
    alias_only = gateway.new_key(models=["m1-alias"])
    assert [m["id"] for m in models_for(gateway, alias_only).json()["data"]] == ["m1-alias"]


def test_keys_and_usage_survive_a_restart(start_gateway: StartGateway, store_config: dict[str, Any],
                                          tmp_path: Path) -> None:
    first = start_gateway(store_config, ready=False)
    created = first.admin("POST", "/admin/keys", json={"name": "keeper", "rpm": 9}).json()
    # A request that reaches routing counts as usage even though its backend is down.
    r = httpx.post(first.url + "/v1/chat/completions", headers={"authorization": f"Bearer {created['key']}"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is the clean exit status.
    assert first.stop() in (0, -15)
    assert "Application shutdown complete" in first.log()
    # Same data directory (embedded store) or same Redis.
    second_config = {**store_config, "data_dir": str(first.directory / "data")}
    second = start_gateway(second_config, ready=False)
    assert second.admin("GET", f"/admin/keys/{created['id']}").json()["rpm"] == 9
    assert models_for(second, created["key"]).status_code == 200
    usage = second.admin("GET", "/admin/usage", params={"group_by": "key"}).json()["data"]
    assert {"key": created["id"], "requests": 1, "errors": 1} .items() <= next(
        u for u in usage if u["key"] == created["id"]).items()


def test_plaintext_is_never_stored_or_logged(start_gateway: StartGateway, redis_url: str) -> None:
    secrets = []
    for store in ("sqlite", "redis"):
        gateway = start_gateway(_config(store, redis_url), ready=False)
        secret = gateway.new_key(name="grep-me")
        secrets.append(secret)
        models_for(gateway, secret)
        models_for(gateway, secret + "x")  # a failed attempt is logged without the secret too
        gateway.stop()
        found = subprocess.run(["grep", "-rlF", secret, str(gateway.directory)], capture_output=True, text=True)
        assert found.stdout == "", f"plaintext key found in {found.stdout}"
        assert secret[6:] not in gateway.log()
    client = redis.Redis.from_url(redis_url)
    dump = b"".join(client.dump(k) or b"" for k in client.scan_iter("*"))
    assert dump, "the Redis store should hold the key records"
    for secret in secrets:
        assert secret.encode() not in dump and secret[6:].encode() not in dump


def test_revocation_reaches_another_replica_within_a_second(start_gateway: StartGateway, redis_url: str) -> None:
    config = _config("redis", redis_url)
    one, two = start_gateway(config, ready=False), start_gateway(config, ready=False)
    created = one.admin("POST", "/admin/keys", json={"name": "shared"}).json()
    assert wait_until(lambda: models_for(two, created["key"]).status_code == 200, 1.0)
    one.admin("DELETE", f"/admin/keys/{created['id']}")
    revoked_at = time.monotonic()
    assert wait_until(lambda: models_for(two, created["key"]).status_code == 401, 1.0, interval=0.02)
    assert time.monotonic() - revoked_at < 1.0


async def test_usage_is_exact_after_200_concurrent_requests(start_gateway: StartGateway, fake_upstream: str) -> None:
    # One key sends all 200 at once: it may hold that many places in the queue.
    gateway = start_gateway({"backends": [{"name": "up", "runtime": "openai", "url": fake_upstream,
                                           "serves": ["fake"], "slots": 64}], "queue": {"max_per_key": 200}})
    key = gateway.new_key(name="counter")
    headers = {"authorization": f"Bearer {key}"}
    counted = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=200)) as client:

        async def one(i: int) -> None:
            stream = i % 2 == 0
            body = {"model": "fake", "messages": [{"role": "user", "content": f"Count to {i}"}],
                    "max_tokens": 1 + i % 7, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
                usage = None
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage":{' in line:
                            usage = json.loads(line[6:])["usage"]
            else:
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
            assert usage is not None
            counted["requests"] += 1
            counted["prompt_tokens"] += usage["prompt_tokens"]
            counted["completion_tokens"] += usage["completion_tokens"]

        await asyncio.gather(*(one(i) for i in range(200)))
    usage = gateway.admin("GET", "/admin/usage", params={"group_by": "key"}).json()["data"]
    assert len(usage) == 1
    assert {k: usage[0][k] for k in counted} == counted
    assert usage[0]["errors"] == 0
