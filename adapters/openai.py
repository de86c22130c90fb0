"""Any already-running OpenAI-compatible server, attached by URL: the passthrough default."""

from __future__ import annotations

from typing import Any

from adapters import shapes
from adapters.base import Adapter
from gateway.openai import Endpoint


class OpenAICompatibleAdapter(Adapter):
    runtime = "openai"
    owned_by = "openai"
    health_path = "/v1/models"
    models_path = "/v1/models"  # its `serves` checked against the list once it is ready (attached only)

    def response(self, endpoint: Endpoint, body: bytes, request: dict[str, Any] | None = None) -> dict[str, Any]:
        # Passed through as it came, but only if it is the OpenAI object asked for: a `url` that
        # points at another service answers its own JSON with a 200 just as readily.
        return shapes.openai_answer(endpoint, super().response(endpoint, body, request))
