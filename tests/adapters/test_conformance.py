"""One OpenAI surface over three runtimes: the same SDK calls against a real llama-server, the
vLLM fake and the Ollama fake, each behind the same real gateway, give answers of the same shape.

Content is asserted only where it is deterministic (the fakes); llama-server's is a real model's
output, so for it only shapes are checked. `owned_by` in /v1/models is the one place a client
may see which runtime answers.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest

from tests.adapters.conftest import FAKED, RUNTIMES, Runtime
from tests.adapters.helpers import shape
from tests.helpers import GatewayProcess

MESSAGES = [{"role": "user", "content": "Name a colour."}]
FINISH = {"stop", "length", "tool_calls"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["colour", "count"]}

each_runtime = pytest.mark.parametrize("rt", RUNTIMES, ids=lambda r: r.name)
each_fake = pytest.mark.parametrize("rt", FAKED, ids=lambda r: r.name)


def check_usage(usage: Any, *, completion: bool = True) -> None:
    assert usage is not None
    assert isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0
    if completion:
        assert isinstance(usage.completion_tokens, int) and usage.completion_tokens >= 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def sse_events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def last_request(backend_urls: dict[str, str], rt: Runtime) -> dict[str, Any]:
    """What the gateway sent to a fake (its test-only endpoint)."""
    return httpx.get(backend_urls[rt.backend] + "/fake/last_request", timeout=10).json()


@pytest.fixture(scope="module")
def backend_urls(runtimes_gateway: GatewayProcess) -> dict[str, str]:
    listing = runtimes_gateway.admin("GET", "/admin/backends")
    assert listing.status_code == 200, listing.text
    return {b["name"]: b["url"] for b in listing.json()["data"]}


# --- models ----------------------------------------------------------------------------------


@each_runtime
def test_models_list_owned_by_is_the_only_difference(client: openai.OpenAI, http: httpx.Client, rt: Runtime) -> None:
    models = {m.id: m for m in client.models.list()}
    assert models[rt.served].owned_by == models[rt.alias].owned_by == rt.name
    raw = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == rt.alias)
    assert set(raw) == {"id", "object", "created", "owned_by"} and raw["object"] == "model"
    assert client.models.retrieve(rt.alias).owned_by == rt.name


# --- chat ------------------------------------------------------------------------------------


@each_runtime
def test_chat(client: openai.OpenAI, rt: Runtime) -> None:
    reply = client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_tokens=8)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert isinstance(reply.created, int)
    assert reply.model == rt.alias
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    check_usage(reply.usage)
    assert 0 < reply.usage.completion_tokens <= 8


@each_runtime
def test_chat_raw_json_has_no_runtime_fields(http: httpx.Client, rt: Runtime) -> None:
    r = http.post("/v1/chat/completions", json={"model": rt.alias, "messages": MESSAGES, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert rt.served not in r.text and "timings" not in r.text and "stop_reason" not in r.text


@each_runtime
def test_stream_without_usage(client: openai.OpenAI, rt: Runtime) -> None:
    chunks = list(client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_tokens=8, stream=True))
    assert chunks and all(c.object == "chat.completion.chunk" and c.model == rt.alias for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None and c.choices for c in chunks), "usage sent although the client did not ask"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@each_runtime
def test_stream_with_usage(client: openai.OpenAI, rt: Runtime) -> None:
    chunks = list(client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.model == rt.alias
    check_usage(last.usage)
    assert 0 < last.usage.completion_tokens <= 6
    assert all(c.usage is None for c in content)
    assert content[-1].choices[0].finish_reason in ("stop", "length")


@each_runtime
def test_max_tokens_cuts_with_length(client: openai.OpenAI, rt: Runtime) -> None:
    reply = client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_completion_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens <= 2
    assert reply.choices[0].finish_reason in ("stop", "length")
    if rt in FAKED:  # the fakes always say more than two words
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


@each_runtime
def test_stop_sequences(client: openai.OpenAI, rt: Runtime) -> None:
    plain = client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_tokens=12, seed=7, temperature=0)
    words = (plain.choices[0].message.content or "").split()
    stop = words[2] if len(words) > 3 else "zzzz"
    for value in (stop, [stop, "qqqq"]):
        cut = client.chat.completions.create(model=rt.alias, messages=MESSAGES, max_tokens=12, seed=7, temperature=0,
                                             stop=value)
        text = cut.choices[0].message.content or ""
        assert stop not in text
        if rt in FAKED:  # deterministic: the same text, up to the stop string
            assert text == " ".join(words[:2]) + " " and cut.choices[0].finish_reason == "stop"


# --- completions -----------------------------------------------------------------------------


@each_runtime
def test_completions(client: openai.OpenAI, rt: Runtime) -> None:
    reply = client.completions.create(model=rt.alias, prompt="The sky is", max_tokens=5)
    assert reply.object == "text_completion" and reply.model == rt.alias and reply.id.startswith("cmpl-")
    assert isinstance(reply.choices[0].text, str) and reply.choices[0].finish_reason in ("stop", "length")
    check_usage(reply.usage)
    streamed = list(client.completions.create(model=rt.alias, prompt="The sky is", max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}))
    *pieces, last = streamed
    assert all(c.object == "text_completion" and c.model == rt.alias for c in streamed)
    assert len({c.id for c in streamed}) == 1 and streamed[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in pieces)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert last.choices == [] and last.usage is not None
    check_usage(last.usage)


# --- embeddings ------------------------------------------------------------------------------


@each_runtime
def test_embeddings(client: openai.OpenAI, http: httpx.Client, rt: Runtime) -> None:
    reply = client.embeddings.create(model=rt.alias, input=["red", "blue"])  # the SDK asks for base64
    assert reply.object == "list" and reply.model == rt.alias
    assert [d.index for d in reply.data] == [0, 1]
    assert all(d.object == "embedding" and len(d.embedding) >= 8 for d in reply.data)
    check_usage(reply.usage, completion=False)
    raw = http.post("/v1/embeddings", json={"model": rt.alias, "input": "red", "encoding_format": "float"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) == {"object", "data", "model", "usage"} and set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert all(isinstance(x, float) for x in body["data"][0]["embedding"])


@pytest.mark.parametrize("rt", RUNTIMES, ids=lambda r: r.name)
def test_embeddings_base64_on_the_wire(http: httpx.Client, rt: Runtime) -> None:
    raw = http.post("/v1/embeddings", json={"model": rt.alias, "input": "red", "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    encoded = raw.json()["data"][0]["embedding"]
    assert isinstance(encoded, str) and len(base64.b64decode(encoded)) % 4 == 0


@each_runtime
def test_embeddings_asked_to_stream_answer_one_json_object(http: httpx.Client, backend_urls: dict[str, str],
                                                            rt: Runtime) -> None:
    r = http.post("/v1/embeddings", json={"model": rt.alias, "input": "red", "encoding_format": "float",
                                          "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    if rt in FAKED:  # embeddings have no stream: the runtime is not asked for one
        sent = last_request(backend_urls, rt)
        assert "input" in sent and "stream" not in sent and "stream_options" not in sent


@each_runtime
def test_empty_embeddings_input(http: httpx.Client, rt: Runtime) -> None:
    # Ollama answered 200 with no embeddings for [] and ""; llama-server refused [[]], vLLM
    # embedded it. Refused everywhere alike, as OpenAI refuses an empty input.
    for empty, param in (([], "input"), ("", "input"), (["a", ""], "input[1]"), ([[]], "input[0]")):
        error = error_of(http.post("/v1/embeddings", json={"model": rt.alias, "input": empty}), 400)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (empty, error)


# --- tools -----------------------------------------------------------------------------------


@each_fake
def test_tool_call_round_trip(client: openai.OpenAI, backend_urls: dict[str, str], rt: Runtime) -> None:
    ask = [{"role": "user", "content": "What is the weather in Oslo? Please call the tool."}]
    reply = client.chat.completions.create(model=rt.alias, messages=ask, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)  # a JSON string, whatever the runtime sent
    assert isinstance(arguments, dict) and set(arguments) == {"city"}
    check_usage(reply.usage)

    follow_up = ask + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    # "none": the fakes would call again, as their last user message still asks for it.
    answer = client.chat.completions.create(model=rt.alias, messages=follow_up, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    sent = last_request(backend_urls, rt)["messages"]
    if rt.name == "ollama":  # translated: arguments an object, the tool result named by its call
        assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": arguments}}]
        assert sent[2] == {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}
    else:
        assert sent[1]["tool_calls"][0]["function"]["arguments"] == call.function.arguments
        assert sent[2]["tool_call_id"] == call.id


@each_fake
def test_streamed_tool_call(client: openai.OpenAI, rt: Runtime) -> None:
    chunks = list(client.chat.completions.create(
        model=rt.alias, messages=[{"role": "user", "content": "call the tool"}], tools=[WEATHER], stream=True,
        stream_options={"include_usage": True}))
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for delta_call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            entry["name"] += (delta_call.function.name or "") if delta_call.function else ""
            entry["arguments"] += (delta_call.function.arguments or "") if delta_call.function else ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert set(json.loads(calls[0]["arguments"])) == {"city"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    check_usage(chunks[-1].usage)


def test_tools_on_llama_server_keep_the_shape(client: openai.OpenAI) -> None:
    """A 270M model may or may not call the tool: whatever it does has the OpenAI shape."""
    reply = client.chat.completions.create(model="chat-llamacpp", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                           tools=[WEATHER], max_tokens=48)
    choice = reply.choices[0]
    assert choice.finish_reason in FINISH
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and isinstance(call.function.arguments, str)
    check_usage(reply.usage)


# --- structured output -----------------------------------------------------------------------


@each_runtime
@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
], ids=["json_object", "json_schema"])
def test_json_response_format(client: openai.OpenAI, backend_urls: dict[str, str], rt: Runtime,
                              fmt: dict[str, Any]) -> None:
    reply = client.chat.completions.create(
        model=rt.alias, messages=[{"role": "user", "content": "Give a colour and a count as JSON."}],
        response_format=fmt, max_tokens=64)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    check_usage(reply.usage)
    if choice.finish_reason == "stop":  # cut by max_tokens, even valid JSON is incomplete
        value = json.loads(choice.message.content or "")
        assert isinstance(value, dict)
        if fmt["type"] == "json_schema" and rt in FAKED:
            assert set(value) == {"colour", "count"} and isinstance(value["count"], int)
    if rt.name == "ollama":
        assert last_request(backend_urls, rt)["format"] == ("json" if fmt["type"] == "json_object" else SCHEMA)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


@each_runtime
def test_invalid_parameter_is_400_naming_it(client: openai.OpenAI, rt: Runtime) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=rt.alias, messages=MESSAGES, temperature=5)
    assert info.value.param == "temperature"


@each_runtime
def test_n_follows_the_table(http: httpx.Client, rt: Runtime) -> None:
    r = http.post("/v1/chat/completions", json={"model": rt.alias, "messages": MESSAGES, "max_tokens": 3, "n": 2})
    if rt.name == "ollama":  # Ollama answers one choice per request: refused, not silently one
        error = error_of(r, 400)
        assert error["param"] == "n" and error["type"] == "invalid_request_error"
    else:
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]


@pytest.mark.parametrize("calls", [5, True])
def test_ollama_refuses_tool_calls_that_are_not_a_list_naming_them(http: httpx.Client, calls: object) -> None:
    r = http.post("/v1/chat/completions", json={"model": "chat-ollama",
                                                "messages": [{"role": "assistant", "tool_calls": calls}, *MESSAGES]})
    error = error_of(r, 400)
    assert error["param"] == "messages[0].tool_calls" and error["type"] == "invalid_request_error"


UPSTREAM_400 = {
    # What each runtime itself refuses, through the same gateway: the error has one shape.
    "llamacpp": {"messages": [{"role": "user", "content": "word " * 3000}]},  # past the 1024-token context
    "vllm": {"messages": [{"role": "user", "content": "word " * 3000}]},  # past --max-model-len 1024
    "ollama": {"messages": [{"role": "user", "content": [  # Ollama rejects the broken base64 itself
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64!"}}]}]},
}


@each_runtime
def test_upstream_error_has_the_openai_shape(http: httpx.Client, rt: Runtime) -> None:
    r = http.post("/v1/chat/completions", json={"model": rt.alias, **UPSTREAM_400[rt.name]})
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error"
    if rt.name != "ollama":
        assert error["code"] == "context_length_exceeded"


@each_fake
def test_error_mid_stream_is_an_openai_error_event(client: openai.OpenAI, http: httpx.Client, rt: Runtime) -> None:
    messages = [{"role": "user", "content": "FAKE_MIDSTREAM_ERROR please"}]
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model=rt.alias, messages=messages, stream=True):
            seen.append(chunk)
    assert seen, "the error came before any content"
    assert info.value.message
    events = sse_events(http.post("/v1/chat/completions", json={"model": rt.alias, "messages": messages,
                                                                "stream": True}))
    assert set(events[-1]) == {"error"} and set(events[-1]["error"]) == {"message", "type", "param", "code"}
    assert events[-1]["error"]["type"] == "server_error"
    error_of(http.post("/v1/chat/completions", json={"model": rt.alias, "messages": messages}), 500)


# --- the same shapes, compared across runtimes ------------------------------------------------


def _shapes_of(http: httpx.Client, rt: Runtime) -> dict[str, Any]:
    chat = {"model": rt.alias, "messages": MESSAGES, "max_tokens": 3}
    stream = sse_events(http.post("/v1/chat/completions", json={**chat, "stream": True,
                                                                "stream_options": {"include_usage": True}}))
    text = {"model": rt.alias, "prompt": "The sky is", "max_tokens": 3}
    text_stream = sse_events(http.post("/v1/completions", json={**text, "stream": True,
                                                                "stream_options": {"include_usage": True}}))
    error = http.post("/v1/chat/completions", json={"model": rt.alias, **UPSTREAM_400[rt.name]})
    return {
        "chat": shape(http.post("/v1/chat/completions", json=chat).json()),
        "chat role chunk": shape(stream[0]),
        "chat content chunk": shape(stream[1]),
        "chat finish chunk": shape(stream[-2]),
        "chat usage chunk": shape(stream[-1]),
        "completion": shape(http.post("/v1/completions", json=text).json()),
        "completion chunk": shape(text_stream[0]),
        "completion finish chunk": shape(text_stream[-2]),
        "completion usage chunk": shape(text_stream[-1]),
        "embeddings": shape(http.post("/v1/embeddings", json={"model": rt.alias, "input": "red",
                                                               "encoding_format": "float"}).json()),
        # `param` and `code` are nullable strings: which one is set depends on the error, not the runtime.
        "error": {key: shape(value) for key, value in error.json()["error"].items() if key in ("message", "type")}
        | {"keys": sorted(error.json()["error"])},
    }


def test_every_runtime_answers_in_the_same_shape(http: httpx.Client) -> None:
    shapes = {rt.name: _shapes_of(http, rt) for rt in RUNTIMES}
    reference = shapes["llamacpp"]
    for name, found in shapes.items():
        for what, value in found.items():
            assert value == reference[what], f"{what}: {name} differs from llamacpp"


# --- what reached the fakes ------------------------------------------------------------------


def test_ollama_gets_native_requests(client: openai.OpenAI, http: httpx.Client, backend_urls: dict[str, str]) -> None:
    ollama = next(r for r in RUNTIMES if r.name == "ollama")
    client.chat.completions.create(model=ollama.alias, messages=MESSAGES, max_completion_tokens=9, stop=["x", "y"],
                                   seed=4, temperature=0.3, top_p=0.8, presence_penalty=0.1, frequency_penalty=0.2)
    sent = last_request(backend_urls, ollama)
    assert sent["model"] == "llama3.2:1b" and sent["stream"] is False
    assert sent["options"] == {"num_predict": 9, "stop": ["x", "y"], "seed": 4, "temperature": 0.3, "top_p": 0.8,
                               "presence_penalty": 0.1, "frequency_penalty": 0.2,
                               "num_ctx": 1024}  # the backend's context, not Ollama's default
    # ... which the model is loaded with (a shorter default would silently cut long prompts).
    loaded = httpx.get(backend_urls[ollama.backend] + "/api/ps", timeout=10).json()["models"]
    assert [m["context_length"] for m in loaded if m["name"] == "llama3.2:1b"] == [1024]

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image").decode()
    client.chat.completions.create(model=ollama.alias, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert last_request(backend_urls, ollama)["messages"] == [
        {"role": "user", "content": "What is this?", "images": [png]}]


@pytest.mark.parametrize("arguments", [
    "[" * 1000 + "]" * 1000,  # was a RecursionError: 500 internal_error
    '{"city": "\\ud800"}',  # a lone surrogate: was a 500 when the upstream body was encoded
    '{"city": NaN, "days": Infinity}',  # was sent to Ollama as nulls
])
def test_ollama_refuses_tool_arguments_that_are_not_strict_json(http: httpx.Client, arguments: str) -> None:
    ollama = next(r for r in RUNTIMES if r.name == "ollama")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = http.post("/v1/chat/completions", json={"model": ollama.alias, "messages": messages, "max_tokens": 2})
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[1].tool_calls[0].function.arguments"


def test_vllm_gets_stream_options_only_when_streaming(http: httpx.Client, backend_urls: dict[str, str]) -> None:
    vllm = next(r for r in RUNTIMES if r.name == "vllm")
    # vLLM itself refuses stream_options without stream; the gateway answers the same everywhere.
    r = http.post("/v1/chat/completions", json={"model": vllm.alias, "messages": MESSAGES, "max_tokens": 2,
                                                "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert "stream_options" not in last_request(backend_urls, vllm)
    sse_events(http.post("/v1/chat/completions", json={"model": vllm.alias, "messages": MESSAGES, "max_tokens": 2,
                                                       "stream": True}))
    assert last_request(backend_urls, vllm)["stream_options"] == {"include_usage": True}
