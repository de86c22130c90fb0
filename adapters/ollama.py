"""Ollama, translated to and from its native API (`/api/chat`, `/api/generate`, `/api/embed`).

Not Ollama's own `/v1` layer: that one cannot set `num_ctx` (long prompts are then silently cut
to Ollama's default context), ignores `max_completion_tokens`, and forces `temperature` and
`top_p` to 1.0 over the model's defaults. The mapping of every OpenAI parameter, and the ones
refused with a 400, are the table in adapters/README.md.

    OpenAI request --request()--> native request         native NDJSON --decoder()--> OpenAI chunks
                                  (options, format,       (role chunk, deltas, finish chunk
                                   tools, images)          with usage; an error line raises)
"""

from __future__ import annotations

import base64
import struct
import time
from typing import TYPE_CHECKING, Any

import msgspec

from adapters import shapes
from adapters.base import Adapter, ErrorMapper, Launch, StreamDecoder, UpstreamRequest, find_binary
from gateway.errors import InvalidRequest, UpstreamError
from gateway.openai import Endpoint, nests_deeper

if TYPE_CHECKING:
    from gateway.config import BackendConfig

PATHS: dict[str, str] = {"chat": "/api/chat", "completions": "/api/generate", "embeddings": "/api/embed"}

# OpenAI parameter -> Ollama option, same meaning and unit.
SAME_OPTIONS = ("seed", "temperature", "top_p", "presence_penalty", "frequency_penalty")
# Sampling extras that llama.cpp and vLLM take as top-level parameters: the same for Ollama.
EXTRA_OPTIONS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "top_k": ("top_k", int),
    "min_p": ("min_p", (int, float)),
    "repeat_penalty": ("repeat_penalty", (int, float)),
    "repetition_penalty": ("repeat_penalty", (int, float)),  # vLLM's name
}
FINISH = {"stop": "stop", "length": "length"}  # `load` / `unload` (no generation) -> "stop"
NOT_INSTALLED = "try pulling it first"
# How deeply tool-call arguments may nest (serde_json's default limit). The decoder's own limit is
# Python's recursion limit less the current stack, which differs where the body is encoded again
# (deeper inside the native body): anything past it could decode here and fail there, as a 500.
MAX_ARGUMENTS_DEPTH = 128

_encode = msgspec.json.encode
# Strict JSON, as the gateway reads request bodies: no NaN or Infinity, no lone surrogate escapes
# (which would decode, then fail to encode into the upstream body), nothing after the value.
_decode = msgspec.json.decode


def normalize_name(name: str) -> str:
    """Ollama's own rule: a name without a tag means `:latest`."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


class OllamaAdapter(Adapter):
    runtime = "ollama"
    owned_by = "ollama"
    health_path = "/"  # 200 "Ollama is running"; nothing listens before that
    load_path = None  # no /metrics: the gateway's own in-flight count is used
    models_path = "/api/tags"

    # --- managed process -------------------------------------------------------------------

    def launch(self, backend: BackendConfig, port: int) -> Launch:
        env = {
            **self.gpu_env(backend),
            "OLLAMA_NUM_PARALLEL": str(backend.slots),
            # The server-wide default context, so even a request without num_ctx (or another
            # client of this server) gets the backend's context rather than Ollama's default.
            "OLLAMA_CONTEXT_LENGTH": str(backend.context),
            **backend.env,
            # Last: the gateway owns the address it probes and forwards to.
            "OLLAMA_HOST": f"127.0.0.1:{port}",
        }
        return Launch([*find_binary(backend.binary, "ollama"), "serve", *backend.args], env)

    def version_command(self, backend: BackendConfig) -> Launch | None:
        return Launch([*find_binary(backend.binary, "ollama"), "--version"], dict(backend.env))

    def setup_commands(self, backend: BackendConfig, base_url: str) -> list[Launch]:
        """`ollama pull NAME` for every served model: a no-op for installed ones, a visible
        download for the others. Attached servers are not the gateway's to change (their
        missing models are reported from `models_path` instead)."""
        if backend.url is not None:
            return []
        host = base_url.split("://", 1)[-1].rstrip("/")
        binary = find_binary(backend.binary, "ollama")
        return [Launch([*binary, "pull", name], {**backend.env, "OLLAMA_HOST": host}) for name in backend.serves]

    def missing_models(self, backend: BackendConfig, status: int, body: bytes) -> list[str]:
        if status != 200:
            return list(backend.serves)
        try:
            data = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
            return list(backend.serves)
        models = data.get("models") if isinstance(data, dict) else None
        installed = {normalize_name(str(m.get(key)))
                     for m in models or [] if isinstance(m, dict) for key in ("name", "model") if m.get(key)}
        return [name for name in backend.serves if normalize_name(name) not in installed]

    # --- requests --------------------------------------------------------------------------

    def request(self, endpoint: Endpoint, body: dict[str, Any], upstream_model: str) -> UpstreamRequest:
        if endpoint == "embeddings":
            return UpstreamRequest(PATHS[endpoint], self._embed_request(body, upstream_model))
        _refuse_unsupported(endpoint, body)
        native: dict[str, Any] = {"model": upstream_model, "stream": bool(body.get("stream"))}  # Ollama defaults to true
        if endpoint == "chat":
            native["messages"] = _messages(body.get("messages") or [])
            tools, choice = body.get("tools"), body.get("tool_choice")
            if tools and choice != "none":
                native["tools"] = tools
        else:
            native["prompt"] = _prompt(body.get("prompt"))
            native["raw"] = True  # /v1/completions continues the text as given: no chat template
            if isinstance(body.get("suffix"), str):
                native["suffix"] = body["suffix"]
        options = self._options(body)
        if options:
            native["options"] = options
        fmt = _format(body.get("response_format"))
        if fmt is not None:
            native["format"] = fmt
        think = _think(body)
        if think is not None:
            native["think"] = think
        return UpstreamRequest(PATHS[endpoint], native)

    def _num_ctx(self) -> dict[str, int]:
        return {"num_ctx": self.backend.context} if self.backend is not None else {}

    def _options(self, body: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            options["num_predict"] = max_tokens
        stop = body.get("stop")
        if stop is not None:
            options["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for key in SAME_OPTIONS:
            if body.get(key) is not None:
                options[key] = body[key]
        for key, (option, kind) in EXTRA_OPTIONS.items():
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InvalidRequest(f"Invalid value for '{key}': expected a number.", param=key)
            options[option] = value
        options.update(self._num_ctx())
        return options

    def _embed_request(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        raw = body.get("input")
        if isinstance(raw, list) and any(not isinstance(item, str) for item in raw):
            raise InvalidRequest("Token-id input is not supported for this model; send text.", param="input")
        # OpenAI refuses an input longer than the context; Ollama would cut it silently.
        native: dict[str, Any] = {"model": model, "input": raw, "truncate": False}
        if body.get("dimensions") is not None:
            native["dimensions"] = body["dimensions"]
        if self.backend is not None:
            native["options"] = self._num_ctx()
        return native

    # --- responses -------------------------------------------------------------------------

    def response(self, endpoint: Endpoint, body: bytes, request: dict[str, Any] | None = None) -> dict[str, Any]:
        data = super().response(endpoint, body, request)
        field, kind = OLLAMA_ANSWERS[endpoint]
        if not isinstance(data.get(field), kind):
            # A `url` pointing at another service answers its own JSON with a 200 just as readily:
            # without this, a client would get an empty answer as a success.
            raise UpstreamError(502, f"The backend's answer is not an Ollama {PATHS[endpoint]} answer: "
                                     f"it has no `{field}`.")
        if endpoint == "embeddings":
            return _embeddings(data, request or {})
        usage = shapes.usage(data.get("prompt_eval_count"), data.get("eval_count"))
        if endpoint == "completions":
            return shapes.text_completion({
                "id": shapes.new_id("cmpl"), "model": data.get("model"), "usage": usage,
                "choices": [{"index": 0, "text": data.get("response") or "", "logprobs": None,
                             "finish_reason": _finish(data.get("done_reason"))}],
            })
        message = data.get("message") if isinstance(data.get("message"), dict) else {}
        calls = _tool_calls(message.get("tool_calls"))
        out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if calls:
            out["tool_calls"] = calls
        if message.get("thinking"):
            out["reasoning_content"] = message["thinking"]
        return shapes.chat_completion({
            "id": shapes.new_id("chatcmpl"), "model": data.get("model"), "usage": usage,
            "choices": [{"index": 0, "message": out, "logprobs": None,
                         "finish_reason": "tool_calls" if calls else _finish(data.get("done_reason"))}],
        })

    def decoder(self, endpoint: Endpoint) -> StreamDecoder:
        return NDJSONDecoder(endpoint, self.error)

    def error(self, status: int | None, body: bytes) -> UpstreamError:
        err = super().error(status, body)
        if err.status == 404 and NOT_INSTALLED in err.message:
            # Listed in `serves` but not (yet) pulled: a backend problem that may pass, not an
            # unknown model (that 404 comes from the gateway itself, before any backend).
            return UpstreamError(503, "This model is not installed on its backend yet; try again later.",
                                 code="model_not_installed")
        return err


class NDJSONDecoder(StreamDecoder):
    """Native NDJSON -> OpenAI chunks: (chat) a role chunk, one chunk per line with text, the
    finish chunk with `finish_reason` and usage from the `done` line. An `{"error": ...}` line
    (sent with HTTP 200) raises, and the core ends the stream with an OpenAI error event."""

    def __init__(self, endpoint: Endpoint, error: ErrorMapper) -> None:
        super().__init__()
        self._endpoint, self._error = endpoint, error
        self._chat = endpoint == "chat"
        self._base = {"id": shapes.new_id("chatcmpl" if self._chat else "cmpl"), "created": int(time.time()),
                      "model": ""}
        self._started = False
        self._calls = 0

    def _chunk(self, choice: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
        data = {**self._base, "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}]}
        if usage is not None:
            data["usage"] = usage
        return shapes.chunk(self._endpoint, data)

    def line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        event = self.json_object(line)
        if "error" in event:
            raise self._error(None, line)
        self._base["model"] = event.get("model") or self._base["model"]
        if self._chat:
            if not self._started:
                self._started = True
                out.append(self._chunk({"delta": {"role": "assistant", "content": ""}}))
            message = event.get("message") if isinstance(event.get("message"), dict) else {}
            delta: dict[str, Any] = {}
            if message.get("thinking"):
                delta["reasoning_content"] = message["thinking"]
            if message.get("content"):
                delta["content"] = message["content"]
            new_calls = _tool_calls(message.get("tool_calls"))
            if new_calls:
                delta["tool_calls"] = [{"index": self._calls + i, **call} for i, call in enumerate(new_calls)]
                self._calls += len(new_calls)
            if delta:
                out.append(self._chunk({"delta": delta}))
        elif event.get("response"):
            out.append(self._chunk({"text": event["response"]}))
        if event.get("done"):
            finish = "tool_calls" if self._calls else _finish(event.get("done_reason"))
            usage = shapes.usage(event.get("prompt_eval_count"), event.get("eval_count"))
            out.append(self._chunk({"delta": {}, "finish_reason": finish} if self._chat
                                   else {"text": "", "finish_reason": finish}, usage))
            self.finished = True


# --- request translation ---------------------------------------------------------------------


def _refuse_unsupported(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """Parameters Ollama cannot honour, refused rather than silently ignored (README table)."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("Only one choice per request is supported for this model: `n` must be 1.", param="n")
    if endpoint == "chat":
        if body.get("logprobs"):
            raise InvalidRequest("Log probabilities are not available for this model.", param="logprobs")
        if body.get("top_logprobs"):
            raise InvalidRequest("Log probabilities are not available for this model.", param="top_logprobs")
        choice = body.get("tool_choice")
        if choice is not None and choice not in ("auto", "none"):
            raise InvalidRequest("This model cannot be forced to call a tool: `tool_choice` may only be "
                                 "\"auto\" or \"none\".", param="tool_choice")
    else:
        if body.get("logprobs"):
            raise InvalidRequest("Log probabilities are not available for this model.", param="logprobs")
        if body.get("echo"):
            raise InvalidRequest("`echo` is not supported for this model.", param="echo")
        if (body.get("best_of") or 1) != 1:
            raise InvalidRequest("Only one candidate per request is supported for this model: `best_of` must be 1.",
                                 param="best_of")
    if body.get("logit_bias"):
        raise InvalidRequest("`logit_bias` is not supported for this model.", param="logit_bias")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise InvalidRequest("Only one prompt per request is supported for this model.", param="prompt")
    raise InvalidRequest("Token-id prompts are not supported for this model; send text.", param="prompt")


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    for i, message in enumerate(messages):
        role = message.get("role")
        text, images = _content(message.get("content"), f"messages[{i}].content")
        native: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if images:
            native["images"] = images
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is None:
                calls = []
            elif not isinstance(calls, list):
                raise InvalidRequest("`tool_calls` must be a list of tool calls.", param=f"messages[{i}].tool_calls")
            function_call = message.get("function_call")  # the deprecated single call
            if function_call is not None:
                if not isinstance(function_call, dict):
                    raise InvalidRequest("`function_call` must be an object.", param=f"messages[{i}].function_call")
                calls = [*calls, {"function": function_call}]
            native_calls = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise InvalidRequest("A tool call needs a `function`.", param=f"messages[{i}].tool_calls[{j}]")
                name = function.get("name")
                if name is not None and not isinstance(name, str):
                    raise InvalidRequest("A tool call's function name must be a string.",
                                         param=f"messages[{i}].tool_calls[{j}].function.name")
                name = name or ""
                arguments = _arguments(function.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments")
                native_calls.append({"function": {"name": name, "arguments": arguments}})
                if call.get("id"):
                    tool_names[str(call["id"])] = name
            if native_calls:
                native["tool_calls"] = native_calls
            if isinstance(message.get("reasoning_content"), str):
                native["thinking"] = message["reasoning_content"]
        elif role == "tool":
            name = tool_names.get(str(message.get("tool_call_id")))
            if name:
                native["tool_name"] = name
        elif role == "function":  # the deprecated tool result
            native["role"] = "tool"
            if message.get("name"):
                native["tool_name"] = str(message["name"])
        out.append(native)
    return out


def _content(content: Any, param: str) -> tuple[str, list[str]]:
    """OpenAI content (a string or parts) -> Ollama's text plus raw base64 images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for k, part in enumerate(content):  # a list of objects: the request schema checked that much
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if text is not None and not isinstance(text, str):
                raise InvalidRequest(f"A `{kind}` content part's `{kind}` must be a string.",
                                     param=f"{param}[{k}].{kind}")
            texts.append(text or "")
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise InvalidRequest("Images must be sent inline as base64 `data:` URLs for this model.",
                                     param=f"{param}[{k}].image_url")
            images.append(url.split(";base64,", 1)[1])
        else:
            raise InvalidRequest(f"Content parts of type `{kind}` are not supported for this model.",
                                 param=f"{param}[{k}]")
    return "\n".join(texts), images


def _arguments(arguments: Any, param: str) -> dict[str, Any]:
    """OpenAI sends tool arguments as a JSON string; Ollama wants the object."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        parsed = _decode(arguments) if isinstance(arguments, str) else None
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        # RecursionError: nested past the stack; UnicodeEncodeError: a str with a raw surrogate
        # (no decoded body holds one, but every failure is the client's same 400).
        parsed = None
    if not isinstance(parsed, dict) or nests_deeper(parsed, MAX_ARGUMENTS_DEPTH):
        raise InvalidRequest("Tool call arguments must be a JSON object encoded as a string (strict JSON, "
                             f"nested at most {MAX_ARGUMENTS_DEPTH} deep).", param=param)
    return parsed


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("`response_format.json_schema.schema` must be a JSON schema object.",
                                 param="response_format.json_schema.schema")
        return schema
    return None


def _think(body: dict[str, Any]) -> Any:
    """Ollama's own `think`, or OpenAI's `reasoning_effort` the way Ollama's /v1 maps it."""
    if isinstance(body.get("think"), (bool, str)):
        return body["think"]
    effort = body.get("reasoning_effort")
    if effort == "none":
        return False
    if effort in ("low", "medium", "high"):
        return effort
    return None


# --- response translation --------------------------------------------------------------------


def _finish(done_reason: Any) -> str:
    return FINISH.get(done_reason, "stop")


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Ollama's calls (arguments an object, no id) -> OpenAI's (arguments a JSON string, an id)."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = _encode(arguments if arguments is not None else {}).decode()
        out.append({"id": call.get("id") or shapes.call_id(), "type": "function",
                    "function": {"name": function.get("name") or "", "arguments": arguments}})
    return out


# What a whole answer of each endpoint must hold (Ollama's own API).
OLLAMA_ANSWERS: dict[str, tuple[str, type]] = {"chat": ("message", dict), "completions": ("response", str),
                                               "embeddings": ("embeddings", list)}


def _embeddings(data: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    vectors = data.get("embeddings") if isinstance(data.get("embeddings"), list) else []
    as_base64 = request.get("encoding_format") == "base64"
    items = []
    for index, vector in enumerate(vectors):
        if as_base64:  # what OpenAI sends: little-endian float32, base64
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append({"object": "embedding", "index": index, "embedding": vector})
    prompt = data.get("prompt_eval_count")
    return shapes.embeddings({"model": data.get("model"), "data": items,
                              "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
