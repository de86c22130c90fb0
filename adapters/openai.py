"""Any already-running OpenAI-compatible server, attached by URL: the passthrough default."""

from adapters.base import Adapter


class OpenAICompatibleAdapter(Adapter):
    runtime = "openai"
    owned_by = "openai"
    health_path = "/v1/models"
