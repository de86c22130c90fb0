"""Admin API for keys and usage. Every route takes the admin key only."""

from __future__ import annotations

import functools
import logging
import math
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import FromPath
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway import keys
from gateway.auth import require_admin
from gateway.errors import BackendUnavailable, GatewayError, InvalidRequest
from gateway.openai import decode_as, encode, nests_deeper
from gateway.store.base import KeyRecordError, hour_of
from gateway.store.redis import OUTAGE

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.admin")

# rpm, tpm and max_concurrency go into Redis's Lua (doubles) and every rate-limit header: a number of
# hundreds of digits is a typo, not a limit, and 2**31 - 1 is far past what any one key needs.
MAX_LIMIT = 2**31 - 1
Limit = Annotated[int, Meta(ge=1, le=MAX_LIMIT)]
Priority = Annotated[int, Meta(ge=-100, le=100)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Models = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=1000)]
When = str | int | float  # RFC 3339 text (read as UTC when it has no offset) or unix seconds
Duration = str | int | float  # seconds, or "90s", "15m", "12h", "30d"


class KeyCreate(Struct, forbid_unknown_fields=True):
    name: Name
    models: Models | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_concurrency: Limit | None = None
    priority: Priority = 0
    expires_at: When | None = None
    expires_in: Duration | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class KeyUpdate(Struct, forbid_unknown_fields=True):
    name: Name | UnsetType = UNSET
    models: Models | None | UnsetType = UNSET
    rpm: Limit | None | UnsetType = UNSET
    tpm: Limit | None | UnsetType = UNSET
    max_concurrency: Limit | None | UnsetType = UNSET
    priority: Priority | UnsetType = UNSET
    expires_at: When | None | UnsetType = UNSET
    expires_in: Duration | None | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class KeyRotate(Struct, forbid_unknown_fields=True):
    grace_period: Duration = 0


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# Longer is a typo ("999999999d"), and now + a century stays well inside what keys.iso can show.
MAX_DURATION = 100 * 365 * 86400
# `metadata` is the operator's own labels (team, owner, ticket), in any JSON. It is kept in the key's
# record, in every replica's key cache and in every listing, so it is bounded: nesting deep enough
# crashed the store's encoder (a RecursionError, answered 500), and its size had no bound but the
# body's. Labels need neither; OpenAI's own `metadata` is 16 flat pairs of at most 64 + 512 characters.
MAX_METADATA_DEPTH = 16  # the metadata object itself is level 1: {"a": {"b": 1}} is 2
MAX_METADATA_BYTES = 16 * 1024  # encoded as compact JSON


def _seconds(value: Duration, field: str) -> float:
    """Checked before anything is stored: a value no answer can show must never reach the store."""
    if isinstance(value, (int, float)) and value >= 0:
        seconds = _float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise InvalidRequest(f"Invalid value for '{field}': expected seconds or a duration such as '30d'.",
                             param=field)
    if not seconds <= MAX_DURATION:  # inf and NaN too
        raise InvalidRequest(f"Invalid value for '{field}': at most 100 years ({MAX_DURATION} seconds).",
                             param=field)
    return seconds


def _timestamp(value: When, field: str) -> float:
    """Checked before anything is stored, like `_seconds`: NaN, infinities and years past 9999 are refused.

    Text without an offset ("2026-01-01T00:00:00", "2026-01-01") is read as UTC: the server's
    local time would make the same request mean different instants on different machines."""
    if isinstance(value, (int, float)):
        timestamp = _float(value)
    else:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            timestamp = parsed.timestamp()
        except (ValueError, OverflowError):
            raise InvalidRequest(f"Invalid value for '{field}': expected RFC 3339 time or unix seconds.",
                                 param=field) from None
    if not keys.EARLIEST <= timestamp <= keys.LATEST:  # NaN fails every comparison
        raise InvalidRequest(f"Invalid value for '{field}': between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z "
                             f"(unix seconds {keys.EARLIEST:.0f} to {keys.LATEST:.0f}).", param=field)
    return timestamp


def _metadata(value: dict[str, Any]) -> None:
    """Checked before anything is stored: at most MAX_METADATA_DEPTH levels, MAX_METADATA_BYTES as JSON."""
    # The depth before the size: encoding metadata nested hundreds deep is what failed.
    if nests_deeper(value, MAX_METADATA_DEPTH):
        raise InvalidRequest(f"Invalid value for 'metadata': nested at most {MAX_METADATA_DEPTH} levels deep.",
                             param="metadata")
    if len(msgspec.json.encode(value)) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"Invalid value for 'metadata': at most {MAX_METADATA_BYTES // 1024} KiB as JSON.",
                             param="metadata")


def _float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an integer of hundreds of digits, as JSON allows: out of every bound
        return math.inf if number > 0 else -math.inf


def _expiry(expires_at: Any, expires_in: Any) -> float | None:
    if expires_at is not None and expires_in is not None:
        raise InvalidRequest("Give `expires_at` or `expires_in`, not both.", param="expires_in")
    if expires_in is not None:
        seconds = _seconds(expires_in, "expires_in")
        if seconds == 0:  # expired the moment it is stored, as an expires_at in the past
            raise InvalidRequest("Invalid value for 'expires_in': more than 0 seconds, or null for a key that "
                                 "never expires.", param="expires_in")
        return time.time() + seconds
    if expires_at is not None:
        return _future(_timestamp(expires_at, "expires_at"))
    return None


def _future(expires_at: float) -> float:
    """An expiry that has passed is refused: the key would be stored, and its secret shown, already
    refused everywhere, a typo (a wrong year) that only its first request would find."""
    now = time.time()
    if expires_at <= now:  # a key expires at that instant (keys.public): "now" has passed too
        raise InvalidRequest(f"Invalid value for 'expires_at': {keys.iso(expires_at)} is in the past (it is "
                             f"{keys.iso(now)} now); give a time to come, or null for a key that never expires.",
                             param="expires_at")
    return expires_at


def _fields(body: KeyCreate | KeyUpdate) -> dict[str, Any]:
    fields = {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not UNSET}
    if "metadata" in fields:
        _metadata(fields["metadata"])
    if "expires_at" in fields or "expires_in" in fields:
        fields["expires_at"] = _expiry(fields.pop("expires_at", None), fields.pop("expires_in", None))
    return fields


def _json(data: Any, status: int = 200) -> Response[Any]:
    return Response(encode(data), status_code=status, media_type="application/json")


def _gateway(request: Request[Any, Any, Any]) -> Gateway:
    require_admin(request)
    return request.app.state.gateway  # type: ignore[no-any-return]


Handler = Callable[..., Awaitable[Response[Any]]]


# An embedded store that cannot write (disk full, a read-only or failing disk) stays so until the
# operator acts: clients retrying it every second would only fill the log.
CANNOT_WRITE_RETRY_AFTER = "30"


def _store_outage_is_503(handler: Handler) -> Handler:
    """A store that is away answers 503 with retry-after, as /v1 does when admission's Redis is
    away: a client's retry logic knows what to do with that, not with a 500 internal_error. So does
    an embedded store that cannot write; its transaction was rolled back, so nothing changed."""

    @functools.wraps(handler)  # Litestar reads the handler's parameters through the wrapper
    async def answer(*args: Any, **kwargs: Any) -> Response[Any]:
        try:
            return await handler(*args, **kwargs)
        except OUTAGE as exc:
            log.warning("%s: the key store is unreachable (%s)", handler.__name__, exc)
            raise BackendUnavailable("The gateway cannot reach its key store; try again shortly.",
                                     headers={"retry-after": "1"}) from None
        except sqlite3.OperationalError as exc:  # SQLITE_FULL, SQLITE_READONLY, SQLITE_IOERR, ...
            log.error("%s: the key store cannot write (%s)", handler.__name__, exc)
            raise BackendUnavailable(f"The key store cannot write: {exc}. Nothing was changed; try again later.",
                                     headers={"retry-after": CANNOT_WRITE_RETRY_AFTER}) from None
        except KeyRecordError as exc:  # a record damaged in the store (by hand, a bug): nothing was changed
            log.error("%s: a key's stored record cannot be read (%s)", handler.__name__, exc)
            # A 500 (the store's fault, not the request's), but no bug: logged once above, no traceback.
            raise GatewayError(f"This key's stored record cannot be read ({exc}); nothing was changed. Fix or "
                               "delete it in the store.", code="key_record_unreadable") from None

    return answer


@post("/admin/keys")
@_store_outage_is_503
async def create_key(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway = _gateway(request)
    fields = _fields(decode_as(await request.body(), KeyCreate))
    key, secret = await keys.issue(gateway.store, fields)
    gateway.keys.apply(key)  # usable the moment the secret is shown
    return _json({**keys.public(key), "key": secret}, 201)


@get("/admin/keys")
@_store_outage_is_503
async def list_keys(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway = _gateway(request)
    q = request.query_params
    status, name = q.get("status", "active"), q.get("name")
    if status not in ("active", "revoked", "expired", "all"):
        raise InvalidRequest("Invalid value for 'status': one of active, revoked, expired, all.", param="status")
    offset, limit = _int_param(q.get("offset"), "offset", 0, 0), _int_param(q.get("limit"), "limit", 100, 1, 1000)
    last_used = await gateway.store.last_used()
    shown = [keys.public(k, last_used.get(k.id)) for k in await gateway.store.all_keys()]
    shown = [k for k in shown if (status == "all" or k["status"] == status)
             and (not name or name.lower() in k["name"].lower())]
    page = shown[offset:offset + limit]
    return _json({"object": "list", "data": page, "total": len(shown), "has_more": offset + limit < len(shown)})


@get("/admin/keys/{key_id:str}")
@_store_outage_is_503
async def show_key(request: Request[Any, Any, Any], key_id: FromPath[str]) -> Response[Any]:
    gateway = _gateway(request)
    key = await keys.fetch(gateway.store, key_id)
    return _json(keys.public(key, (await gateway.store.last_used()).get(key_id)))


@patch("/admin/keys/{key_id:str}")
@_store_outage_is_503
async def update_key(request: Request[Any, Any, Any], key_id: FromPath[str]) -> Response[Any]:
    gateway = _gateway(request)
    fields = _fields(decode_as(await request.body(), KeyUpdate))
    key = await keys.update(gateway.store, key_id, fields)
    gateway.keys.apply(key)
    return _json(keys.public(key))


@delete("/admin/keys/{key_id:str}", status_code=200)
@_store_outage_is_503
async def revoke_key(request: Request[Any, Any, Any], key_id: FromPath[str]) -> Response[Any]:
    gateway = _gateway(request)
    key = await keys.revoke(gateway.store, key_id)
    gateway.keys.apply(key)  # refused from this answer on
    return _json(keys.public(key))


@post("/admin/keys/{key_id:str}/rotate")
@_store_outage_is_503
async def rotate_key(request: Request[Any, Any, Any], key_id: FromPath[str]) -> Response[Any]:
    gateway = _gateway(request)
    body = decode_as(await request.body(), KeyRotate)
    key, secret = await keys.rotate(gateway.store, key_id, _seconds(body.grace_period, "grace_period"))
    gateway.keys.apply(key)
    return _json({**keys.public(key), "key": secret})


_GROUPS = {"key", "model", "hour", "day"}


@get("/admin/usage")
@_store_outage_is_503
async def usage(request: Request[Any, Any, Any]) -> Response[Any]:
    """Totals per group over [start, end), hour granularity. Defaults: the last 24 hours, by key and model."""
    gateway = _gateway(request)
    q = request.query_params
    now = time.time()
    end = _timestamp(_num(q["end"]), "end") if q.get("end") else now + 3600
    start = _timestamp(_num(q["start"]), "start") if q.get("start") else now - 86400
    if end < start:
        # An empty answer would read as "no usage" when it is the range that is wrong. Named: the
        # one the admin gave (`end` when both), told against the default they may not have meant.
        param = "end" if q.get("end") else "start"
        raise InvalidRequest(
            f"Invalid value for '{param}': `end` ({keys.iso(end)}{'' if q.get('end') else ', the default'}) "
            f"is before `start` ({keys.iso(start)}{'' if q.get('start') else ', the default'}).", param=param)
    group_by = [g for g in q.get("group_by", "key,model").split(",") if g]
    if unknown := set(group_by) - _GROUPS:
        raise InvalidRequest(f"Invalid value for 'group_by': unknown {sorted(unknown)}; use key, model, hour, day.",
                             param="group_by")
    await gateway.usage.flush()  # this replica's last second of counts, so the answer is current
    totals: dict[tuple[Any, ...], dict[str, int]] = {}
    for (hour, key_id, model), delta in await gateway.store.usage(hour_of(start), end):
        parts = {"key": key_id, "model": model, "hour": keys.iso(hour), "day": keys.iso(hour - hour % 86400)}
        group = tuple(parts[g] for g in group_by)
        row = totals.setdefault(group, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0})
        for field in row:
            row[field] += getattr(delta, field)
    data = [{**dict(zip(group_by, group)), **row, "total_tokens": row["prompt_tokens"] + row["completion_tokens"]}
            for group, row in sorted(totals.items(), key=lambda item: tuple(str(p) for p in item[0]))]
    return _json({"object": "list", "start": keys.iso(hour_of(start)), "end": keys.iso(end),
                  "group_by": group_by, "data": data})


def _num(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        return value


def _int_param(raw: str | None, name: str, default: int, low: int, high: int | None = None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': expected an integer.", param=name) from None
    if value < low or (high is not None and value > high):
        raise InvalidRequest(f"Invalid value for '{name}': out of range.", param=name)
    return value


ROUTES = [create_key, list_keys, show_key, update_key, revoke_key, rotate_key, usage]
