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
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from litestar import Request

from gateway import metrics
from gateway.config import AuthConfig, LimitValues
from gateway.errors import AuthenticationFailed, ModelNotFound, PermissionDenied
from gateway.routing import Route
from gateway.store.base import ApiKey, KeyRecordError, Store, hash_secret, log_unreadable

log = logging.getLogger("gateway.auth")

# How often the cache asks a store whose change feed can lose messages (Redis pub/sub) whether
# any key changed since it last read them all: a safety net under the feed.
KEYS_VERSION_INTERVAL = 60.0
RELOAD_RETRY = 1.0  # after a failed reload or refresh
STOP_WAIT = 2.0  # seconds stop() waits for the change feed to end


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


class KeyIndex:
    """The keys as `authenticate` reads them: by the hashes that open them, each with its Principal.

    The live index changes one key at a time, on the event loop. A full load builds a new one
    (`build`, a pure function run in a thread) and the cache swaps it in whole."""

    def __init__(self, defaults: LimitValues) -> None:
        self.defaults = defaults
        self.by_id: dict[str, ApiKey] = {}
        self.by_hash: dict[str, ApiKey] = {}
        self.principals: dict[str, Principal] = {}

    @classmethod
    def build(cls, keys: Iterable[ApiKey], defaults: LimitValues) -> KeyIndex:
        index = cls(defaults)
        for key in keys:
            index.put(key.id, key)
        return index

    def put(self, key_id: str, key: ApiKey | None) -> None:
        """One key as it now is (None: gone). Its old record's hashes go first: a rotated-out or
        revoked record left behind would still open, since it matches its own hash."""
        old = self.by_id.pop(key_id, None)
        if old is not None:
            for digest in _indexed_hashes(old):
                if self.by_hash.get(digest) is old:
                    del self.by_hash[digest]
        self.principals.pop(key_id, None)
        if key is not None:
            self.by_id[key_id] = key
            for digest in _indexed_hashes(key):
                self.by_hash[digest] = key
            self.principals[key_id] = self._principal(key)

    def set_defaults(self, defaults: LimitValues) -> None:
        self.defaults = defaults
        self.principals = {key_id: self._principal(key) for key_id, key in self.by_id.items()}

    def _principal(self, key: ApiKey) -> Principal:
        d = self.defaults
        return Principal(
            key_id=key.id,
            models=frozenset(key.models) if key.models is not None else None,
            rpm=key.rpm if key.rpm is not None else d.rpm,
            tpm=key.tpm if key.tpm is not None else d.tpm,
            max_concurrency=key.max_concurrency if key.max_concurrency is not None else d.max_concurrency,
            priority=key.priority,
        )


def _ended(key: ApiKey | None) -> bool:
    """The key can make no more requests, ever: revoked (nothing undoes that), or gone from the
    store. (An expired one can: an admin may extend it.)"""
    return key is None or key.revoked_at is not None


def _indexed_hashes(key: ApiKey) -> tuple[str, ...]:
    # The previous hash whether or not its grace period is over: `authenticate` checks the
    # period at each request, so the index does not depend on the clock.
    return (key.hash, key.previous_hash) if key.previous_hash else (key.hash,)


class KeyCache:
    def __init__(self, store: Store, auth: AuthConfig, defaults: LimitValues) -> None:
        self._store = store
        self._required = auth.required
        self._index = KeyIndex(defaults)
        self._loaded_version: Hashable | None = None  # the store's keys_version() before the last reload read it
        self._task: asyncio.Task[None] | None = None
        self._changed_while_loading: list[set[str]] = []  # one set per reload reading the store
        self.set_defaults(defaults)

    def set_defaults(self, defaults: LimitValues) -> None:
        """Limits for keys that set none (a config reload may change them)."""
        self._defaults = defaults
        self._anonymous = Principal("anonymous", None, defaults.rpm, defaults.tpm, defaults.max_concurrency, 0)
        self._index.set_defaults(defaults)  # every key's Principal carries the defaults it does not override

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._follow(), name="key-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: the feed's step is a redis-py read, which can swallow a cancellation
            # (its own timeout firing in the same instant) and read on; shutdown must not wait for it.
            await asyncio.wait({self._task}, timeout=STOP_WAIT)

    async def reload(self) -> None:
        """Every key, decoded and indexed off the event loop (10,000 keys take a few hundred
        milliseconds, which every request in flight would wait), then swapped in at once."""
        changed: set[str] = set()
        self._changed_while_loading.append(changed)
        try:
            version = await self._store.keys_version()  # before the keys: any write after it moves it
            keys = await self._store.all_keys()
            index = await asyncio.to_thread(KeyIndex.build, keys, self._defaults)
        finally:
            self._changed_while_loading.remove(changed)
        # A key applied while the store was read, or the index built, is newer than what the read saw.
        for key_id in changed:
            index.put(key_id, self._index.by_id.get(key_id))
        if index.defaults is not self._defaults:  # a config reload meanwhile
            index.set_defaults(self._defaults)
        ended = [key_id for key_id, key in self._index.by_id.items()
                 if key.revoked_at is None and _ended(index.by_id.get(key_id))]
        self._index = index
        self._loaded_version = version
        for key_id in ended:  # revoked or gone while the feed missed it
            metrics.forget_key(key_id)

    async def refresh(self, key_id: str) -> None:
        try:
            key = await self._store.get_key(key_id)
        except KeyRecordError as exc:  # as a reload leaves it out: it opens nothing
            log_unreadable(key_id, exc)
            key = None
        self._put(key_id, key)

    def ended(self, key_id: str) -> bool:
        """The key of a request that just finished can make no more (revoked or gone meanwhile)."""
        return key_id != self._anonymous.key_id and _ended(self._index.by_id.get(key_id))

    def apply(self, key: ApiKey) -> None:
        """A key as this replica's admin API just wrote it: in force before the answer goes out,
        without waiting for the change feed (which tells the other replicas)."""
        self._put(key.id, key)

    def _put(self, key_id: str, key: ApiKey | None) -> None:
        self._index.put(key_id, key)
        for changed in self._changed_while_loading:
            changed.add(key_id)
        if _ended(key):
            metrics.forget_key(key_id)

    async def _follow(self) -> None:
        """Apply the store's key changes as they come; reload everything whenever the feed may
        have missed some: it says None (after a reconnect), or, on a store whose feed can lose
        messages, its keys version has moved since the last reload (looked at every
        KEYS_VERSION_INTERVAL).

        The feed's next item is awaited with asyncio.wait, which leaves it pending when the
        interval passes first. asyncio.wait_for would cancel it, and cancelling an async
        generator's pending step ends the generator: every later change, revocations included,
        would be lost until a restart."""
        changes = self._store.key_changes()
        pending: asyncio.Future[str | None] | None = None
        stale = False  # the last reload or refresh failed: the change it was for is still missing
        check_at = self._next_check(stale=False)
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(changes))
                timeout = None if check_at is None else max(0.0, check_at - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=timeout)
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
                checking = check_at is not None and time.monotonic() >= check_at
                try:
                    # (A change the feed brought as a check fell due is in what the reload reads.)
                    if (done and key_id is None) or (checking and (stale or await self._keys_moved())):
                        await self.reload()
                        stale, check_at = False, self._next_check(stale=False)
                    else:
                        if key_id is not None:
                            await self.refresh(key_id)
                        if checking:
                            check_at = self._next_check(stale=False)
                except Exception as exc:  # noqa: BLE001 - keep serving from the last good cache
                    # The change it was for is missed until a reload succeeds: the next try is
                    # soon, not a full interval away (after a Redis restart the first read often
                    # meets a dead pooled connection, and a revoked key would open for a minute).
                    log.warning("key cache refresh failed (%s); serving the last loaded keys, reloading in %gs",
                                exc, RELOAD_RETRY)
                    stale, check_at = True, self._next_check(stale=True)
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending}, timeout=STOP_WAIT)  # (see stop)

    def _next_check(self, stale: bool) -> float | None:
        """When to look next for changes the feed did not bring: soon after a failure, never on a
        store whose feed misses none (its keys_version() is None)."""
        if stale:
            return time.monotonic() + RELOAD_RETRY
        if self._loaded_version is None:
            return None
        return time.monotonic() + KEYS_VERSION_INTERVAL

    async def _keys_moved(self) -> bool:
        # Every write moves the version, those the feed did bring too: an interval with a key
        # change ends with a reload (off the event loop); one with none costs a single read.
        #
        # So does the store losing its data (Redis restarted without persistence, flushed):
        # the store says so at ERROR, and the cache follows it, keys gone and all, as after any
        # change. Keeping the keys loaded before would serve clients a while longer, but every
        # replica would then hold its own set (none at all for one started since), different
        # from what the admin API lists, a revocation could not reach a key the store no longer
        # has, and a deliberate flush would never take. Following the store, every replica
        # answers alike, and the operator's fix (a restored backup, keys issued again) reaches
        # them all the same way.
        return await self._store.keys_version() != self._loaded_version

    def authenticate(self, authorization: str | None) -> Principal:
        """The key behind an `Authorization` header's value."""
        secret = bearer(authorization)
        if secret is None:
            if not self._required:
                return self._anonymous
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`; an admin issues keys.")
        digest = hash_secret(secret)
        index = self._index
        key = index.by_hash.get(digest)
        now = time.time()
        # Found by its hash, so comparing secrets again would add nothing; what is checked is that
        # this hash still opens the key (a rotated-out secret's grace period ends) and the key is live.
        if key is None or not key.usable(now) or (digest != key.hash and digest not in key.hashes(now)):
            raise AuthenticationFailed("Incorrect API key provided, or the key was revoked or has expired.")
        return index.principals[key.id]
