"""Admin API for backends: state, logs (tail and live follow), start / stop / restart.
Every route takes the admin key only.

    GET  /admin/backends                       every backend: state, pid, port, uptime, restarts, ...
    GET  /admin/backends/{name}                one of them
    GET  /admin/backends/{name}/logs?tail=N    the last N lines: JSON, or text with format=text
         ...&follow=1                          then every new line, streamed (text/plain; SSE with
                                               format=sse or `Accept: text/event-stream`)
    POST /admin/backends/{name}/start|stop|restart[?wait=S][&drain=0]
         waits up to S seconds (default 60) for the outcome: 200 with the backend when it got there,
         202 when still on its way, 503 when the start failed (the reason in the message).
         stop and restart first let in-flight requests finish, unless drain=0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.response import Stream

from gateway.auth import require_admin
from gateway.errors import BackendUnavailable, InvalidRequest, NotFound
from gateway.openai import encode
from gateway.supervisor.process import StartFailed

if TYPE_CHECKING:
    from gateway.supervisor.supervisor import Backend, Supervisor

DEFAULT_TAIL = 100
DEFAULT_WAIT = 60.0
SSE_KEEPALIVE = 15.0
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _json(data: Any, status: int = 200) -> Response[Any]:
    return Response(encode(data), status_code=status, media_type="application/json")


def _supervisor(request: Request[Any, Any, Any]) -> Supervisor:
    require_admin(request)
    return request.app.state.gateway.supervisor  # type: ignore[no-any-return]


def _backend(supervisor: Supervisor, name: str, *, managed: bool = False) -> Backend:
    backend = supervisor.get(name)
    if backend is None:
        raise NotFound(f"No backend named `{name}`. GET /admin/backends lists them.")
    if managed and backend.process is None:
        raise InvalidRequest(f"Backend `{name}` is attached (`url`): the gateway does not run it, so it cannot "
                             "start or stop it.")
    return backend


def _number(raw: str | None, name: str, default: float, low: float, high: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': expected a number.", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"Invalid value for '{name}': between {low:g} and {high:g}.", param=name)
    return value


def _flag(raw: str | None, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    return raw.lower() in ("1", "true", "yes", "on")


@get("/admin/backends")
async def list_backends(request: Request[Any, Any, Any]) -> Response[Any]:
    supervisor = _supervisor(request)
    return _json({"object": "list", "data": [b.describe() for b in supervisor.backends.values()]})


@get("/admin/backends/{name:str}")
async def show_backend(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    return _json(_backend(_supervisor(request), name).describe())


@get("/admin/backends/{name:str}/logs")
async def backend_logs(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    backend = _backend(_supervisor(request), name)
    q = request.query_params
    keep = backend.log.lines.maxlen or 0
    tail = int(_number(q.get("tail"), "tail", DEFAULT_TAIL, 0, keep))
    follow = _flag(q.get("follow"), False)
    fmt = q.get("format")
    if fmt is None:
        accept = request.headers.get("accept", "")
        fmt = "sse" if "text/event-stream" in accept else "text" if (follow or "text/plain" in accept) else "json"
    if fmt not in ("json", "text", "sse"):
        raise InvalidRequest("Invalid value for 'format': one of json, text, sse.", param="format")
    if follow:
        if fmt == "json":
            raise InvalidRequest("follow=1 streams text or SSE: use format=text or format=sse.", param="format")
        media = "text/event-stream" if fmt == "sse" else "text/plain; charset=utf-8"
        return Stream(_follow(backend, tail, sse=fmt == "sse"), media_type=media, headers=STREAM_HEADERS)
    lines = backend.log.tail(tail)
    if fmt == "json":
        return _json({"backend": backend.name, "lines": lines})
    if fmt == "sse":
        return Response("".join(_event(line) for line in lines), media_type="text/event-stream")
    return Response("".join(f"{line}\n" for line in lines), media_type="text/plain; charset=utf-8")


def _event(line: str) -> str:
    return f"data: {line}\n\n"


async def _follow(backend: Backend, tail: int, *, sse: bool) -> AsyncIterator[str]:
    """The last `tail` lines, then each new one, until the client leaves (Litestar cancels the
    stream on disconnect) or the gateway stops (the log sends its followers None)."""
    # Subscribe before reading the tail, in the same event-loop step: no line lost or doubled.
    queue = backend.log.follow()
    try:
        for line in backend.log.tail(tail):
            yield _event(line) if sse else f"{line}\n"
        while True:
            try:
                line = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE) if sse else await queue.get()
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # proxies close silent connections
                continue
            if line is None:
                return
            yield _event(line) if sse else f"{line}\n"
    finally:
        backend.log.unfollow(queue)


async def _operate(request: Request[Any, Any, Any], name: str, action: str) -> Response[Any]:
    supervisor = _supervisor(request)
    backend = _backend(supervisor, name, managed=True)
    q = request.query_params
    wait = _number(q.get("wait"), "wait", DEFAULT_WAIT, 0, 3600)
    task = supervisor.operate(backend, action, drain=_flag(q.get("drain"), True))
    done, _ = await asyncio.wait([task], timeout=wait)  # the task goes on if this request ends
    if not done:
        return _json(backend.describe(), 202)
    try:
        task.result()
    except StartFailed as exc:
        raise BackendUnavailable(f"Backend `{name}` did not start: {exc}") from None
    return _json(backend.describe())


@post("/admin/backends/{name:str}/start", status_code=200)
async def start_backend(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    return await _operate(request, name, "start")


@post("/admin/backends/{name:str}/stop", status_code=200)
async def stop_backend(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    return await _operate(request, name, "stop")


@post("/admin/backends/{name:str}/restart", status_code=200)
async def restart_backend(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    return await _operate(request, name, "restart")


ROUTES = [list_backends, show_backend, backend_logs, start_backend, stop_backend, restart_backend]
