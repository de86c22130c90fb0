"""Who is asking: the admin key for /admin, API keys for /v1 (see the keys store)."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request

from gateway.errors import AuthenticationFailed, PermissionDenied


def bearer(request: Request[Any, Any, Any]) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request[Any, Any, Any]) -> None:
    """Admin routes take only the admin key (never an API key), compared in constant time."""
    admin_key: str | None = request.app.state.gateway.config.admin.key
    if not admin_key:
        raise PermissionDenied("The admin API is disabled: set admin.key (typically ${GATEWAY_ADMIN_KEY}).")
    given = bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise AuthenticationFailed("Invalid admin key. Admin routes need `Authorization: Bearer <admin key>`.")
