"""Small tools for the adapter unit tests: feed a stream, collect its chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from adapters.base import Adapter


async def feed(*lines: bytes | str | dict[str, Any]) -> AsyncIterator[bytes]:
    """Lines as aiohttp's StreamReader yields them (each with its newline)."""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode()
        yield line + b"\n"


def sse(obj: dict[str, Any] | str) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj))


async def collect(adapter: Adapter, endpoint: str, *lines: bytes | str | dict[str, Any]) -> list[dict[str, Any]]:
    return [chunk async for chunk in adapter.stream(endpoint, feed(*lines))]  # type: ignore[arg-type]


def shape(value: Any) -> Any:
    """The structure of a JSON value (keys and types, not contents), for comparing runtimes."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "int" if isinstance(value, int) else "float"
    return type(value).__name__
