"""The public wire format: request validation, SSE framing and the shapes the gateway writes.

A request body is decoded once, here, into a plain dict (so parameters the gateway does not know
still reach the runtime) and its known fields are type-checked strictly against the structs
below, so a wrong type is a 400 that names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from gateway.errors import InvalidRequest

Endpoint = Literal["chat", "completions", "embeddings"]

PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class StreamOptions(Struct):
    include_usage: bool | None = None


class Message(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class Function(Struct):
    name: str


class Tool(Struct):
    type: str
    function: Function


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]


Stop = str | Annotated[list[str], Meta(max_length=4)] | None
# Token counts: beyond int32 no runtime takes them, and the limiter's arithmetic stays sane.
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]


class _Sampling(Struct):
    model: str
    stream: bool | None = False  # null allowed, as OpenAI's: not streamed
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Meta(min_length=1)] = msgspec.field(default_factory=list)
    max_completion_tokens: PositiveInt | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str | int | list[int]] = ""
    echo: bool | None = None
    logprobs: int | None = None


# OpenAI refuses an empty input, and the runtimes disagree on one (Ollama answers 200 with no
# embeddings, llama-server refuses [[]] and vLLM embeds it): refused here, once, for every runtime.
Text = Annotated[str, Meta(min_length=1)]
TokenIds = Annotated[list[int], Meta(min_length=1)]


class EmbeddingRequest(Struct):
    model: str
    input: Text | Annotated[list[Text | int | TokenIds], Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None


_SCHEMAS: dict[Endpoint, type[Struct]] = {
    "chat": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}
_REQUIRED = {"chat": ("model", "messages"), "completions": ("model", "prompt"), "embeddings": ("model", "input")}

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
encode = _encoder.encode
_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def decode_request(endpoint: Endpoint, body: bytes) -> dict[str, Any]:
    """Bytes -> the request dict, or InvalidRequest naming the offending field."""
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        data = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise InvalidRequest(NESTED) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for field in _REQUIRED[endpoint]:
        if field not in data:
            raise InvalidRequest(f"Missing required parameter: '{field}'.", param=field)
    # Strict, as OpenAI is ("5" is not an integer, "false" not a boolean): the dict goes on to
    # the runtime and into the limiter's estimate as it came, so what passes here must be what
    # the schema says, not something a conversion would have made of it.
    try:
        msgspec.convert(data, _SCHEMAS[endpoint])
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    return data


T = TypeVar("T")


def decode_as(body: bytes, schema: type[T]) -> T:
    """Bytes -> a typed struct (admin API bodies), or InvalidRequest naming the field."""
    try:
        return msgspec.json.decode(body or b"{}", type=schema)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise InvalidRequest(NESTED) from None


NESTED = "The request body is nested too deeply."


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether objects and lists nest more than `limit` deep in a decoded JSON value (the value
    itself is level 1), walked without recursion: it may be as deep as the decoder allowed."""
    pending: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
_FIELD = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")


def _invalid(detail: str) -> InvalidRequest:
    match = _AT.search(detail)
    param = match.group(1) if match else None
    reason = _AT.sub("", detail)
    if field := _FIELD.match(reason):  # name the field itself, not the object holding it
        param = f"{param}.{field.group(1)}" if param else field.group(1)
    if param:
        return InvalidRequest(f"Invalid value for '{param}': {reason}.", param=param)
    return InvalidRequest(f"Invalid request: {reason}.")


def wants_usage(request: dict[str, Any]) -> bool:
    options = request.get("stream_options")
    return bool(isinstance(options, dict) and options.get("include_usage"))


# --- SSE framing ---------------------------------------------------------------------------

DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
