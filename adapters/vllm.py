"""vLLM's `vllm serve`: OpenAI-compatible, with its own readiness, error shapes and extra fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from adapters import shapes
from adapters.base import Adapter, Health, Launch, Load, SSEDecoder, StreamDecoder, find_binary
from gateway.errors import UpstreamError
from gateway.openai import Endpoint

if TYPE_CHECKING:
    from gateway.config import BackendConfig

# vLLM renamed its KV-cache gauge in late 2025; read the new name, fall back to the old.
KV_CACHE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class VllmAdapter(Adapter):
    runtime = "vllm"
    owned_by = "vllm"
    health_path = "/health"
    load_path = "/metrics"
    # An attached vLLM's `serves` checked against its --served-model-name list once it is ready
    # (a managed one is started with them).
    models_path = "/v1/models"

    def launch(self, backend: BackendConfig, port: int) -> Launch:
        assert backend.model is not None
        argv = [
            *find_binary(backend.binary, "vllm"), "serve", backend.model,
            "--host", "127.0.0.1",  # vLLM listens on every interface unless told
            "--port", str(port),
            "--served-model-name", *backend.serves,
            "--max-num-seqs", str(backend.slots),
            "--max-model-len", str(backend.context),
        ]
        env = {**self.gpu_env(backend), **backend.env}
        if backend.api_key:
            # Not `--api-key`: any local user can read a command line (`ps`, /proc/PID/cmdline),
            # only the process's owner its environment. Last, so it is the key the gateway sends.
            env["VLLM_API_KEY"] = backend.api_key
        # The operator's args come last: vLLM's argparse takes the last value of a repeated flag.
        return Launch(argv + list(backend.args), env)

    def version_command(self, backend: BackendConfig) -> Launch | None:
        return Launch([*find_binary(backend.binary, "vllm"), "--version"], dict(backend.env))

    def health(self, status: int, body: bytes) -> Health:
        # Refused connections mean "still loading" (the probe sees no answer at all); once it
        # answers, /health is 200, and 503 means the engine died: it will not come back.
        return Health.READY if status == 200 else Health.BROKEN

    def load(self, status: int, body: bytes) -> Load | None:
        if status != 200:
            return None
        try:
            families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8", "replace"))}
        except ValueError:
            return None

        def values(name: str) -> list[float]:
            family = families.get(name)
            return [s.value for s in family.samples if s.name == name] if family else []

        running, waiting = values("vllm:num_requests_running"), values("vllm:num_requests_waiting")
        cache = next((v for v in (values(n) for n in KV_CACHE_GAUGES) if v), [])
        if not (running or waiting or cache):
            return None
        return Load(
            running=sum(running) if running else None,
            waiting=sum(waiting) if waiting else None,
            # Several engines (data parallel) report one gauge each: the fullest one limits.
            kv_cache_usage_ratio=max(cache) if cache else None,
        )

    # Rebuilt in the one OpenAI shape: `stop_reason`, `token_ids`, `prompt_logprobs`,
    # `kv_transfer_params` go; `reasoning` becomes `reasoning_content`; the chunk that carries the
    # last token and `finish_reason` is split in two, as llama.cpp and OpenAI send them.

    def response(self, endpoint: Endpoint, body: bytes, request: dict[str, Any] | None = None) -> dict[str, Any]:
        return shapes.canonical(endpoint, super().response(endpoint, body, request))

    def decoder(self, endpoint: Endpoint) -> StreamDecoder:
        return SSEDecoder(self.error, lambda chunk: [shapes.chunk(endpoint, piece)
                                                     for piece in shapes.split_finish(endpoint, chunk)])

    def error(self, status: int | None, body: bytes) -> UpstreamError:
        # Nested `{"error": {...}}`, the older flat `{"object": "error", ...}`, FastAPI's
        # `{"detail": ...}` and the plain-string 401 are all read by the base class.
        err = super().error(status, body)
        if err.status == 400 and "maximum context length" in err.message:
            err.code = "context_length_exceeded"  # what OpenAI and the llama.cpp adapter say
        return err
