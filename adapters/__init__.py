"""One module per runtime; `for_runtime` is the only place that maps a runtime name to code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.base import Adapter, Health, Launch, Load, UpstreamRequest
from adapters.llamacpp import LlamaCppAdapter
from adapters.ollama import OllamaAdapter
from adapters.openai import OpenAICompatibleAdapter
from adapters.vllm import VllmAdapter

if TYPE_CHECKING:
    from gateway.config import BackendConfig

_ADAPTERS: dict[str, type[Adapter]] = {
    "llamacpp": LlamaCppAdapter,
    "vllm": VllmAdapter,
    "ollama": OllamaAdapter,
    "openai": OpenAICompatibleAdapter,
}


def for_runtime(runtime: str, backend: BackendConfig | None = None) -> Adapter:
    """A new adapter for one backend (its config lets it translate requests, e.g. Ollama's num_ctx)."""
    try:
        cls = _ADAPTERS[runtime]
    except KeyError:
        raise ValueError(f"no adapter for runtime {runtime!r} (known: {', '.join(sorted(_ADAPTERS))})") from None
    return cls(backend)


__all__ = ["Adapter", "Health", "Launch", "Load", "UpstreamRequest", "for_runtime"]
