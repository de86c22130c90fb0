"""Who is asking: the admin key for /admin, API keys for /v1.

API keys are looked up in memory by the hash of the presented secret; the cache is loaded from
the store at start and kept fresh by the store's change feed (pub/sub on Redis), so the hot path
never waits on a store and a revocation reaches every replica within a second.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from litestar import Request

from gateway.config import AuthConfig, LimitValues
from gateway.errors import AuthenticationFailed, ModelNotFound, PermissionDenied
from gateway.routing import Route
from gateway.store.base import ApiKey, Store, hash_secret

log = logging.getLogger("gateway.auth")

FULL_RELOAD_INTERVAL = 60.0  # a safety net under the change feed
RELOAD_RETRY = 1.0  # after a failed reload or refresh


@dataclass(frozen=True)
class Principal:
    """The caller of one request, with the limits that apply to it."""

    key_id: str  # "anonymous" when auth is off
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    priority: int

    def may_use(self, route: Route) -> bool:
        # Listing a served name grants its aliases; listing an alias grants only the alias.
        return self.models is None or route.public in self.models or route.served in self.models

    def check_model(self, route: Route) -> None:
        if not self.may_use(route):
            raise ModelNotFound(route.public)  # exactly as for a model that does not exist


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request[Any, Any, Any]) -> None:
    """Admin routes take only the admin key (never an API key), compared in constant time."""
    admin_key: str | None = request.app.state.gateway.config.admin.key
    if not admin_key:
        raise PermissionDenied("The admin API is disabled: set admin.key (typically ${GATEWAY_ADMIN_KEY}).")
    given = bearer(request.headers.get("authorization"))
    if given is None or not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise AuthenticationFailed("Invalid admin key. Admin routes need `Authorization: Bearer <admin key>`.")


class KeyCache:
    def __init__(self, store: Store, auth: AuthConfig, defaults: LimitValues) -> None:
        self._store = store
        self._required = auth.required
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._principals: dict[str, Principal] = {}  # key id -> its Principal, rebuilt with the cache
        self._task: asyncio.Task[None] | None = None
        self._changed_while_loading: list[set[str]] = []  # one set per reload reading the store
        self.set_defaults(defaults)

    def set_defaults(self, defaults: LimitValues) -> None:
        """Limits for keys that set none (a config reload may change them)."""
        self._defaults = defaults
        self._anonymous = Principal("anonymous", None, defaults.rpm, defaults.tpm, defaults.max_concurrency, 0)
        self._rebuild()  # every key's Principal carries the defaults it does not override

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._follow(), name="key-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def reload(self) -> None:
        changed: set[str] = set()
        self._changed_while_loading.append(changed)
        try:
            keys = await self._store.all_keys()
        finally:
            self._changed_while_loading.remove(changed)
        by_id = {k.id: k for k in keys}
        # A key applied while the store was read is newer than what the read saw.
        for key_id in changed:
            if key_id in self._by_id:
                by_id[key_id] = self._by_id[key_id]
            else:
                by_id.pop(key_id, None)
        self._by_id = by_id
        self._rebuild()

    async def refresh(self, key_id: str) -> None:
        self._put(key_id, await self._store.get_key(key_id))

    def apply(self, key: ApiKey) -> None:
        """A key as this replica's admin API just wrote it: in force before the answer goes out,
        without waiting for the change feed (which tells the other replicas)."""
        self._put(key.id, key)

    def _put(self, key_id: str, key: ApiKey | None) -> None:
        if key is None:
            self._by_id.pop(key_id, None)
        else:
            self._by_id[key_id] = key
        for changed in self._changed_while_loading:
            changed.add(key_id)
        self._rebuild()

    def _rebuild(self) -> None:
        now = time.time()
        self._by_hash = {h: k for k in self._by_id.values() for h in k.hashes(now)}
        self._principals = {key.id: self._principal(key) for key in self._by_id.values()}

    def _principal(self, key: ApiKey) -> Principal:
        d = self._defaults
        return Principal(
            key_id=key.id,
            models=frozenset(key.models) if key.models is not None else None,
            rpm=key.rpm if key.rpm is not None else d.rpm,
            tpm=key.tpm if key.tpm is not None else d.tpm,
            max_concurrency=key.max_concurrency if key.max_concurrency is not None else d.max_concurrency,
            priority=key.priority,
        )

    async def _follow(self) -> None:
        """Apply the store's key changes as they come; reload everything at least every
        FULL_RELOAD_INTERVAL, and whenever the feed may have missed some (it says None).

        The feed's next item is awaited with asyncio.wait, which leaves it pending when the
        interval passes first. asyncio.wait_for would cancel it, and cancelling an async
        generator's pending step ends the generator: every later change, revocations included,
        would be lost until a restart."""
        changes = self._store.key_changes()
        pending: asyncio.Future[str | None] | None = None
        next_full = time.monotonic() + FULL_RELOAD_INTERVAL
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(changes))
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, next_full - time.monotonic()))
                key_id: str | None = None
                if done:
                    step, pending = pending, None
                    try:
                        key_id = step.result()
                    except Exception as exc:  # noqa: BLE001 - the feed ended or broke: start it again
                        log.warning("key change feed ended (%s); starting it again", str(exc) or type(exc).__name__)
                        await asyncio.sleep(1.0)
                        changes = self._store.key_changes()  # starts with None: a full reload
                        continue
                try:
                    if key_id is None or time.monotonic() >= next_full:
                        await self.reload()
                        next_full = time.monotonic() + FULL_RELOAD_INTERVAL
                    else:
                        await self.refresh(key_id)
                except Exception as exc:  # noqa: BLE001 - keep serving from the last good cache
                    # The change it was for is missed until a reload succeeds: the next try is
                    # soon, not a full interval away (after a Redis restart the first read often
                    # meets a dead pooled connection, and a revoked key would open for a minute).
                    log.warning("key cache refresh failed (%s); serving the last loaded keys, reloading in %gs",
                                exc, RELOAD_RETRY)
                    next_full = time.monotonic() + RELOAD_RETRY
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    def authenticate(self, authorization: str | None) -> Principal:
        """The key behind an `Authorization` header's value."""
        secret = bearer(authorization)
        if secret is None:
            if not self._required:
                return self._anonymous
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`; an admin issues keys.")
        digest = hash_secret(secret)
        key = self._by_hash.get(digest)
        now = time.time()
        # Found by its hash, so comparing secrets again would add nothing; what is checked is that
        # this hash still opens the key (a rotated-out secret's grace period ends) and the key is live.
        if key is None or not key.usable(now) or (digest != key.hash and digest not in key.hashes(now)):
            raise AuthenticationFailed("Incorrect API key provided, or the key was revoked or has expired.")
        return self._principals[key.id]
