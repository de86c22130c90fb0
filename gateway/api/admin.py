"""Admin API for the gateway itself: reload the config (also on SIGHUP)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Request, Response, post

from gateway.auth import require_admin
from gateway.openai import encode

if TYPE_CHECKING:
    from gateway.app import Gateway


@post("/admin/reload", status_code=200)
async def reload(request: Request[Any, Any, Any]) -> Response[Any]:
    """Re-read the config file: unchanged backends keep running, removed ones drain and stop, new
    ones start. An invalid file, or a change that needs a restart, changes nothing: 400 says why."""
    require_admin(request)
    gateway: Gateway = request.app.state.gateway
    return Response(encode(await gateway.reload()), media_type="application/json")


ROUTES = [reload]
