"""One module per runtime; `for_runtime` is the only place that maps a runtime name to code."""

from adapters.base import Adapter, Health, Launch, UpstreamRequest
from adapters.llamacpp import LlamaCppAdapter
from adapters.openai import OpenAICompatibleAdapter

_ADAPTERS: dict[str, type[Adapter]] = {
    "llamacpp": LlamaCppAdapter,
    "openai": OpenAICompatibleAdapter,
}


def for_runtime(runtime: str) -> Adapter:
    try:
        return _ADAPTERS[runtime]()
    except KeyError:
        raise ValueError(f"no adapter for runtime {runtime!r} (known: {', '.join(sorted(_ADAPTERS))})") from None


__all__ = ["Adapter", "Health", "Launch", "UpstreamRequest", "for_runtime"]
