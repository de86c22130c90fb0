"""Every error a client can see, each knowing its OpenAI `type`, `code` and HTTP status.

    GatewayError
     ├── InvalidRequest          400 invalid_request_error
     ├── AuthenticationFailed    401 invalid_api_key
     ├── PermissionDenied        403 permission_denied
     ├── ModelNotFound           404 model_not_found
     ├── NotFound                404 not_found
     ├── MethodNotAllowed        405 method_not_allowed
     ├── RequestTimeout          408 request_timeout       (the request did not arrive in time; then the connection closes)
     ├── BodyTooLarge            413 request_too_large
     ├── UnsupportedEncoding     415 unsupported_content_encoding (a compressed body)
     ├── RateLimited             429 rate_limit_exceeded   (carries retry-after)
     ├── HeadTooLarge            431 request_header_fields_too_large (then the connection closes)
     ├── ClientClosedRequest     499 client_closed         (the client left; nobody reads it)
     ├── BackendUnavailable      503 backend_unavailable   (no ready backend, or all failed)
     ├── UpstreamTimeout         504 upstream_timeout
     ├── UpstreamError           any status the runtime gave, normalised to the OpenAI shape
                                 (429 rate_limit_exceeded unless it named a code; its retry-after kept)
     └── InternalError           500 internal_error        (never with a traceback)

A handler raises one of these; `app.py` renders it once, as `{"error": {...}}`.
"""

from __future__ import annotations

import msgspec


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    # Whether gateway_rejected_total counts it (app.py, by its status): False for one a metric
    # of its own counts already, so that an operator adding the counters up sees it once.
    rejection = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = None


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedEncoding(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class HeadTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RateLimited(GatewayError):
    """`kind` is OpenAI's `type` for it: "requests" or "tokens" (per minute), the limit that was
    hit. `retry_after` None: waiting cannot help (the request is larger than the limit)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None, kind: str = "requests",
                 headers: dict[str, str] | None = None) -> None:
        merged: dict[str, str] = {}
        if retry_after is not None:
            # The official SDKs honour both: retry-after in whole seconds, retry-after-ms exactly.
            wait = max(retry_after, 0.001)
            merged = {"retry-after": str(max(1, int(wait + 0.999))), "retry-after-ms": str(int(wait * 1000))}
        merged.update(headers or {})
        super().__init__(message, headers=merged)
        self.type = kind
        self.retry_after = retry_after


class ClientClosedRequest(GatewayError):
    status = 499
    type = "invalid_request_error"
    code = "client_closed"


class BackendUnavailable(GatewayError):
    """Always with a retry-after (1 s unless told): a client or load balancer should come back,
    or go to another replica, soon."""

    status = 503
    type = "server_error"
    code = "backend_unavailable"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"retry-after": "1", **(headers or {})})


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamError(GatewayError):
    """An error the runtime answered with, in the OpenAI shape, keeping the runtime's status."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type or _type_for_status(status)
        if code is None:
            # A runtime's 429 seldom names a code; OpenAI clients look for this one.
            self.code = "rate_limit_exceeded" if status == 429 else None


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


def _type_for_status(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"
