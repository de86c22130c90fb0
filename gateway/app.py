"""`create_app(config)`: the routes, the error rendering, and one lifespan owning every resource."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException

from gateway import metrics
from gateway.admission import open_admission
from gateway.api import admin, admin_backends, admin_keys, health, v1
from gateway.auth import KeyCache
from gateway.config import Config, ConfigError, RoutingConfig, load
from gateway.cors import cors_config, with_cors
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    UpstreamError,
)
from gateway.loadwatch import LoadWatch
from gateway.openai import PATHS
from gateway.routing import Cooldowns, ModelTable
from gateway.sendwatch import SendWatch
from gateway.store import open_store
from gateway.store.lockfile import exclusive
from gateway.store.redis import OUTAGE
from gateway.supervisor import Supervisor
from gateway.upstream import Upstream
from gateway.usage import UsageRecorder

log = logging.getLogger("gateway")


# Sections a reload may change; the others (listening address, stores, keys' rules) need a restart.
RELOADABLE = ("backends", "models", "routing", "limits", "metrics")
CUT_REQUESTS_TIMEOUT = 2.0  # seconds: a cut stream's last words are bounded at 1 s (v1._last_words)


class ReloadRefused(InvalidRequest):
    code = "reload_refused"


class Gateway:
    """The services one gateway process holds; handlers reach them through `app.state.gateway`."""

    def __init__(self, config: Config, config_path: str | None = None, file_config: Config | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self._file_config = file_config or config  # as written, before --host/--port
        self._reload_lock = asyncio.Lock()
        self._opened = False  # the lifespan has opened everything (`started` is the start time)
        self._reload_waiting = False  # a SIGHUP came before that
        # Shutting down (the server stopped accepting): requests waiting for admission or for a
        # backend to start are answered 503 at once, so clients retry elsewhere, not at the end
        # of the grace period with a 500.
        self.closing = False
        self.admitting: set[asyncio.Task[Any]] = set()
        # Every request's task: uvicorn's own set, handed over by gateway/cli.py (empty under
        # another server), for the lifespan shutdown to wait for the ones it cut.
        self.requests: set[asyncio.Task[Any]] = set()
        self.cannot_start: str | None = None  # why the start failed, when it is the operator's to fix
        self.started = int(time.time())
        self.redis = _redis_client(config.store.url) if config.store.url else None
        self.store = open_store(config, self.redis)
        self.keys = KeyCache(self.store, config.auth, config.limits.default)
        self.usage = UsageRecorder(self.store)
        self.admission = open_admission(config, self.redis)
        self.supervisor = Supervisor(config)
        self.models = ModelTable(self.supervisor.backends.values(), config.models.aliases)
        self.loads = LoadWatch(self.supervisor.backends.values(), config.routing.load_interval)
        self.cooldowns: Cooldowns | None = None
        self.affinity_header: bytes | None = None
        self._apply_routing(config.routing)
        for backend in config.backends:
            metrics.backend_known(backend.name, backend.runtime, backend.slots)
        self.upstream = Upstream(connect_timeout=config.server.connect_timeout,
                                 request_timeout=config.server.request_timeout)
        self.sends = SendWatch(config.server.send_timeout)

    def _apply_routing(self, routing: RoutingConfig) -> None:
        """At start, and on a reload that changed `routing` (max_attempts is read per request).
        The cooldowns start afresh: failures counted under the old thresholds mean nothing under
        new ones."""
        if self.cooldowns is not None:
            self.supervisor.on_ready.remove(self.cooldowns.reset)
        self.cooldowns = Cooldowns(routing.cooldown_failures, routing.cooldown_window, routing.cooldown)
        self.supervisor.on_ready.append(self.cooldowns.reset)
        self.loads.interval = routing.load_interval
        # Matched against raw ASGI header names, which arrive lower-cased.
        self.affinity_header = routing.affinity_header.lower().encode() if routing.affinity_header else None

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        # Opened in dependency order, closed in reverse; each close runs even if a later open failed.
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._open(stack)
            except CANNOT_START as exc:  # said in one line (FrontDoor), not as a traceback
                self.cannot_start = str(exc) or type(exc).__name__
                log.debug("start failed", exc_info=exc)  # the traceback, for log_level debug
                raise
            self._opened = True
            if self._reload_waiting:
                self._reload_on_signal()
            _settle_garbage_collector()
            yield

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        # First: SIGHUP's default action ends the process, and starting can take a while (an
        # eager backend loading its model). One that comes meanwhile is applied once started.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        stack.callback(loop.remove_signal_handler, signal.SIGHUP)
        if self.redis is not None:
            stack.push_async_callback(self.redis.aclose)
        else:
            stack.enter_context(exclusive(self.config.data_dir / "gateway.lock"))
        await self.upstream.open()
        stack.push_async_callback(self.upstream.close)
        await self.store.open()
        stack.push_async_callback(self.store.close)
        await self.keys.start()
        stack.push_async_callback(self.keys.stop)
        await self.usage.start()
        stack.push_async_callback(self.usage.stop)
        await self.admission.start()
        stack.push_async_callback(self.admission.stop)
        await self.supervisor.start()
        stack.push_async_callback(self.supervisor.stop)
        await self.loads.start()
        stack.push_async_callback(self.loads.stop)
        await self.sends.start()
        stack.push_async_callback(self.sends.stop)
        stack.push_async_callback(self._let_cut_requests_finish)  # first at the exit

    async def _let_cut_requests_finish(self) -> None:
        """The lifespan shutdown's first step. uvicorn starts it right after cancelling the
        requests that outlived the grace period, without waiting for them. Their cancel paths
        record their usage (a stream's last words to a slow client may take a second first),
        which the final flush must find."""
        running = [task for task in self.requests if not task.done()]
        if not running:
            return  # the usual case: the grace period was enough
        _, still = await asyncio.wait(running, timeout=CUT_REQUESTS_TIMEOUT)
        if still:
            log.error("shutdown: %d requests cut at the end of the grace period still ran after %g s; "
                      "usage they had not recorded is lost", len(still), CUT_REQUESTS_TIMEOUT)

    def begin_shutdown(self) -> None:
        """The server stops accepting: what only waits is told to go now (v1._admitted answers it)."""
        self.closing = True
        for task in list(self.admitting):
            task.cancel()

    def _reload_on_signal(self) -> None:
        if not self._opened:
            if not self._reload_waiting:
                log.info("SIGHUP while starting: the config is re-read once the gateway has started")
            self._reload_waiting = True
            return
        self._reload_waiting = False

        async def run() -> None:
            try:
                summary = await self.reload()
                log.info("config reloaded on SIGHUP: %s", summary)
            except GatewayError as exc:
                log.error("config reload on SIGHUP refused, nothing changed: %s", exc.message)
            except Exception:  # a bug: the operator must hear of it now, not at the next SIGHUP
                log.exception("config reload on SIGHUP failed")

        task = asyncio.ensure_future(run())
        self._reload_task = task  # keep a reference until it ends

    async def reload(self) -> dict[str, object]:
        """Re-read the config file and apply what changed; all or nothing."""
        if not self.config_path:
            raise ReloadRefused("This gateway was started without a config file, so there is nothing to re-read.")
        async with self._reload_lock:
            try:
                new = load(self.config_path)
            except ConfigError as exc:
                raise ReloadRefused("The config file is invalid; nothing changed: " + "; ".join(exc.problems)) from None
            old = self._file_config
            assert old is not None
            fixed = [name for name in Config.model_fields if name not in (*RELOADABLE, "queue")
                     and getattr(new, name) != getattr(old, name)]
            if new.queue.model_copy(update={"max_wait": old.queue.max_wait}) != old.queue:
                fixed.append("queue (all but max_wait)")
            if fixed:
                raise ReloadRefused(f"Changed sections need a restart: {', '.join(sorted(set(fixed)))}; nothing changed.")
            summary = await self.supervisor.apply(new)
            if new.routing != old.routing:
                self._apply_routing(new.routing)
            self._file_config = new
            self.config = new.model_copy(update={"server": self.config.server})
            self.models = ModelTable(self.supervisor.backends.values(), new.models.aliases)
            self.loads.replace(self.supervisor.backends.values())
            self.keys.set_defaults(new.limits.default)
            for backend in new.backends:
                metrics.backend_known(backend.name, backend.runtime, backend.slots)
            return {"reloaded": True, **summary}


def _settle_garbage_collector() -> None:
    """Keep the cyclic GC off the hot path, measured with `make bench`.

    Everything alive once the gateway has started (Litestar, pydantic, the config) lives as long
    as the process; `gc.freeze()` takes it out of every later collection, and a larger first
    threshold runs the young collections less often: together about 40 us less CPU per request
    and 1.3x streamed throughput. Requests make few reference cycles, so little waits longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def _redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis.asyncio as redis

    # Short socket bounds: a Redis that stops answering must fail requests fast, never hang them.
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=15)


_REJECTIONS = {401: "auth", 400: "invalid", 404: "model_not_found", 405: "method", 413: "too_large",
               415: "unsupported_encoding", 503: "unavailable"}


def _render(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    error = _rendered(exc, request.method, request.url.path)
    return Response(error.encode(), status_code=error.status, media_type="application/json",
                    headers=error.headers)


def _rendered(exc: Exception, method: str, path: str, request_id: str | None = None) -> GatewayError:
    """The OpenAI error a failure is answered with, counted and (if a bug) logged once."""
    error = _as_gateway_error(exc)
    if isinstance(error, InternalError):
        log.exception("unhandled error on %s %s", method, path, exc_info=exc,
                      extra={"request_id": request_id} if request_id else None)
    if (error.rejection and (reason := _REJECTIONS.get(error.status)) and path.startswith("/v1/")
            and not isinstance(error, UpstreamError)):
        metrics.rejected.labels(reason).inc()
    return error


class FrontDoor:
    """POSTs to the OpenAI endpoints go straight to their handler; everything else goes through
    Litestar. Those handlers are raw ASGI already (gateway/api/v1.py), and Litestar's router,
    middleware stack and scope set-up around them were 6 % of a request's instructions
    (bench/count.py: see bench/README.md). Their errors are rendered here exactly as Litestar's
    exception handler renders them (`_render`), and their other methods still go to Litestar.
    """

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self._hot = {path: endpoint for endpoint, path in PATHS.items()}
        self._cors = app.cors_config  # Litestar's middleware does the same for its own routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = self._hot.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            if scope["type"] == "http":
                send = _with_request_id(scope, send)
            elif scope["type"] == "lifespan":
                send = _with_startup_reason(self.app, send)
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        if self._cors is not None:
            send = with_cors(self._cors, scope, send)
        try:
            await v1.serve(scope, receive, send, endpoint)
        except Exception as exc:
            # `serve` gives its GatewayErrors their x-request-id; a bug's 500 gets one here.
            request_id = exc.headers.get("x-request-id") if isinstance(exc, GatewayError) else None
            request_id = request_id or _request_id(scope)
            error = _rendered(exc, "POST", scope["path"], request_id)
            error.headers.setdefault("x-request-id", request_id)
            headers = [(b"content-type", b"application/json"),
                       *((name.encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items())]
            body = error.encode()
            headers.append((b"content-length", str(len(body)).encode()))
            try:
                await send({"type": "http.response.start", "status": error.status, "headers": headers})
            except RuntimeError:
                raise exc from None  # the answer had begun: uvicorn closes the connection
            await send({"type": "http.response.body", "body": body})


# What an operator fixes rather than reports: another gateway on the data dir, Redis unreachable
# or too old, a directory it may not write, a store file it cannot use (store.sqlite.StoreUnusable,
# a RuntimeError). Anything else is a bug and keeps its traceback.
CANNOT_START = (RuntimeError, OSError, *OUTAGE)


def _with_startup_reason(app: Litestar, send: Any) -> Any:
    """`send` for the lifespan: a start that failed for a reason in CANNOT_START is logged by
    uvicorn as that reason in one line, where Litestar would hand it the whole traceback."""

    async def send_startup_reason(message: Any) -> None:
        if message["type"] == "lifespan.startup.failed" and (reason := app.state.gateway.cannot_start):
            message = {**message, "message": f"The gateway cannot start: {reason}"}
        await send(message)

    return send_startup_reason


def _with_request_id(scope: Any, send: Any) -> Any:
    """`send`, adding x-request-id to a response that has none. Only Litestar's routes go through
    it: the OpenAI POSTs set their own, and their hot path pays for nothing here."""

    async def send_with_request_id(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if not any(name.lower() == b"x-request-id" for name, _ in headers):
                request_id = _request_id(scope).encode()
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
        await send(message)

    return send_with_request_id


def _request_id(scope: Any) -> str:
    """The client's x-request-id if valid, else a new one, as the OpenAI handlers choose it."""
    given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
    return v1.request_id(given.decode("latin-1") if given is not None else None)


def _as_gateway_error(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound("Unknown path. The API lives under /v1 (for example /v1/chat/completions).")
        if exc.status_code == 405:  # keeps the Allow header Litestar's router sets
            return MethodNotAllowed("This path does not accept that HTTP method.", headers=dict(exc.headers or {}))
        if exc.status_code == 413:
            return BodyTooLarge("The request body is larger than this gateway accepts (server.max_body).")
        if 400 <= exc.status_code < 500:
            return InvalidRequest(str(exc.detail))
        return UpstreamError(exc.status_code, str(exc.detail))
    return InternalError("The gateway failed to handle this request; the operator's log has the details.")


def create_app(config: Config, config_path: str | None = None, file_config: Config | None = None) -> FrontDoor:
    gateway = Gateway(config, config_path, file_config)
    app = Litestar(
        route_handlers=[*v1.ROUTES, *health.ROUTES, *admin.ROUTES, *admin_keys.ROUTES, *admin_backends.ROUTES],
        lifespan=[gateway.lifespan],
        exception_handlers={Exception: _render},
        # Bodies over the bound are refused from Content-Length alone, or as soon as the bytes
        # read pass it; never read whole into memory.
        request_max_body_size=config.server.max_body,
        cors_config=cors_config(config.server.cors_origins),
        openapi_config=None,
        logging_config=None,  # gateway.logsetup configures logging once, for text or JSON
        debug=False,
    )
    app.state.gateway = gateway
    return FrontDoor(app)
