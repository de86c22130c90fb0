"""Ollama's translation tables, both ways, without a server: OpenAI -> native requests, native
replies and NDJSON streams -> OpenAI objects (shapes.py rules), errors, launch and setup."""

from __future__ import annotations

import base64
import json
import struct

import msgspec
import pytest

from adapters import for_runtime
from adapters.base import Health
from adapters.ollama import MAX_ARGUMENTS_DEPTH, OllamaAdapter
from gateway.config import BackendConfig
from gateway.errors import InvalidRequest, UpstreamError
from tests.adapters.helpers import collect

BACKEND = BackendConfig(name="ol", runtime="ollama", model="llama3.2:1b", serves=["llama3.2:1b", "qwen2.5:0.5b"],
                        slots=3, context=2048, env={"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_HOST": "0.0.0.0:1"},
                        gpus="1", binary=["/opt/ollama"])
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def adapter() -> OllamaAdapter:
    made = for_runtime("ollama", BACKEND)
    assert isinstance(made, OllamaAdapter)
    return made


def chat(adapter: OllamaAdapter, **body: object) -> dict:
    request = adapter.request("chat", {"model": "public", "messages": [{"role": "user", "content": "hi"}], **body},
                              "llama3.2:1b")
    assert request.path == "/api/chat"
    return request.body


# --- requests: OpenAI -> native ----------------------------------------------------------------


def test_chat_request_maps_sampling_to_options(adapter: OllamaAdapter) -> None:
    body = chat(adapter, max_tokens=7, stop="END", seed=3, temperature=0.2, top_p=0.9, presence_penalty=0.5,
                frequency_penalty=-0.5, top_k=20, repetition_penalty=1.1, user="u-1")
    assert body["model"] == "llama3.2:1b"
    assert body["stream"] is False  # explicit: Ollama streams unless told not to
    assert body["options"] == {"num_predict": 7, "stop": ["END"], "seed": 3, "temperature": 0.2, "top_p": 0.9,
                               "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_k": 20,
                               "repeat_penalty": 1.1, "num_ctx": 2048}
    assert "user" not in body and "max_tokens" not in body


def test_max_completion_tokens_wins_and_stop_lists_stay_lists(adapter: OllamaAdapter) -> None:
    body = chat(adapter, max_tokens=100, max_completion_tokens=5, stop=["a", "b"], stream=True)
    assert body["options"]["num_predict"] == 5 and body["options"]["stop"] == ["a", "b"]
    assert body["stream"] is True and "stream_options" not in body


def test_num_ctx_is_the_backends_context_even_without_sampling_options(adapter: OllamaAdapter) -> None:
    assert chat(adapter)["options"] == {"num_ctx": 2048}
    assert "options" not in OllamaAdapter().request("chat", {"messages": []}, "m").body  # no config, no guess


def test_response_format(adapter: OllamaAdapter) -> None:
    assert chat(adapter, response_format={"type": "json_object"})["format"] == "json"
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert chat(adapter, response_format={"type": "json_schema",
                                          "json_schema": {"name": "s", "schema": schema, "strict": True}})["format"] == schema
    assert "format" not in chat(adapter, response_format={"type": "text"})
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, response_format={"type": "json_schema", "json_schema": {"name": "s"}})
    assert info.value.param == "response_format.json_schema.schema"


def test_tools_and_tool_calls_both_directions(adapter: OllamaAdapter) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "tool", "tool_call_id": "unknown", "content": "?"},
    ]
    body = chat(adapter, messages=messages, tools=TOOLS, tool_choice="auto")
    assert body["tools"] == TOOLS  # OpenAI's tool format is Ollama's too
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},  # an object, not a string
            {"function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},  # looked up by tool_call_id
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "?"},
    ]


def test_tool_choice(adapter: OllamaAdapter) -> None:
    assert "tools" not in chat(adapter, tools=TOOLS, tool_choice="none")
    assert chat(adapter, tools=TOOLS)["tools"] == TOOLS
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(InvalidRequest) as info:
            chat(adapter, tools=TOOLS, tool_choice=choice)
        assert info.value.param == "tool_choice"


def test_bad_tool_arguments_are_a_400(adapter: OllamaAdapter) -> None:
    messages = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=messages)
    assert info.value.param == "messages[0].tool_calls[0].function.arguments"


@pytest.mark.parametrize("arguments", [
    "[" * 1000 + "]" * 1000,  # deeper than the decoder can go: was a RecursionError, a 500
    '{"a":' * 1000 + "1" + "}" * 1000,
    '{"a":' * 200 + "1" + "}" * 200,  # decodable, but deeper than the cap (encoding upstream could fail)
    '{"a":"\\ud800"}',  # a lone surrogate escape: was parsed, then the upstream body could not be encoded
    '{"a":"\\udc00x"}',
    '{"a":NaN,"b":Infinity}',  # not JSON: reached Ollama as null, null
    '{"a":-Infinity}',
    '{"a":1e400}',  # beyond a double: reached Ollama as null
    '{"a":1} {"b":2}',
])
def test_tool_arguments_that_are_not_strict_json_are_the_same_400(adapter: OllamaAdapter, arguments: str) -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}},
                                                      {"id": "d", "function": {"name": "g", "arguments": arguments}}]}]
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=messages)
    assert info.value.param == "messages[1].tool_calls[1].function.arguments"
    assert (info.value.status, info.value.type) == (400, "invalid_request_error")


def test_tool_arguments_as_deep_as_the_cap_still_reach_ollama(adapter: OllamaAdapter) -> None:
    nesting = MAX_ARGUMENTS_DEPTH - 1  # objects around the innermost list, which is one level too
    arguments = '{"a":' * nesting + '[1, 2.5, "\\ud83d\\ude00"]' + "}" * nesting  # a surrogate *pair* is fine
    expected: object = [1, 2.5, "\U0001f600"]
    for _ in range(nesting):
        expected = {"a": expected}
    body = chat(adapter, messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                       "arguments": arguments}}]}])
    assert body["messages"][0]["tool_calls"][0]["function"]["arguments"] == expected
    msgspec.json.encode(body)  # what the gateway sends upstream


@pytest.mark.parametrize(("assistant", "param"), [
    ({"tool_calls": 5}, "messages[0].tool_calls"),
    ({"tool_calls": True}, "messages[0].tool_calls"),
    ({"tool_calls": "call_1"}, "messages[0].tool_calls"),  # not a list of its characters
    ({"tool_calls": {"id": "c", "function": {"name": "f", "arguments": "{}"}}}, "messages[0].tool_calls"),
    ({"function_call": "f"}, "messages[0].function_call"),  # not silently dropped
    ({"tool_calls": [{"id": "c", "function": {"name": {"n": "f"}, "arguments": "{}"}}]},
     "messages[0].tool_calls[0].function.name"),
])
def test_tool_calls_of_the_wrong_shape_are_a_400_naming_the_field(adapter: OllamaAdapter, assistant: dict,
                                                                   param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=[{"role": "assistant", **assistant}, {"role": "user", "content": "hi"}])
    assert info.value.param == param


def test_the_deprecated_function_call_joins_the_tool_calls(adapter: OllamaAdapter) -> None:
    body = chat(adapter, messages=[{"role": "assistant", "tool_calls": None,
                                    "function_call": {"name": "f", "arguments": '{"x": 1}'}}])
    assert body["messages"][0]["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 1}}}]


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "text", "text": ["a"]}, "messages[0].content[0].text"),
    ({"type": "text", "text": {"t": "a"}}, "messages[0].content[0].text"),
    ({"type": "refusal", "refusal": 5}, "messages[0].content[0].refusal"),
])
def test_a_text_part_that_is_not_text_is_a_400_naming_it(adapter: OllamaAdapter, part: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=[{"role": "user", "content": [part]}])
    assert info.value.param == param


def test_refusal_parts_are_text_and_a_part_without_text_is_empty(adapter: OllamaAdapter) -> None:
    body = chat(adapter, messages=[{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"},
                                                                     {"type": "text", "text": None}]}])
    assert body["messages"][0]["content"] == "no\n"


def test_images_become_raw_base64(adapter: OllamaAdapter) -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    body = chat(adapter, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"}},
        {"type": "text", "text": "be short"},
    ]}])
    assert body["messages"] == [{"role": "user", "content": "what is this?\nbe short", "images": [png]}]
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert info.value.param == "messages[0].content[0].image_url"
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert info.value.param == "messages[0].content[0]"


@pytest.mark.parametrize(("params", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"top_k": "many"}, "top_k"),
])
def test_parameters_ollama_cannot_honour_are_400s_naming_them(adapter: OllamaAdapter, params: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(adapter, **params)
    assert info.value.status == 400 and info.value.param == param


def test_harmless_defaults_are_accepted(adapter: OllamaAdapter) -> None:
    body = chat(adapter, n=1, logprobs=False, logit_bias={}, parallel_tool_calls=True, stream_options=None)
    assert set(body) == {"model", "stream", "messages", "options"}


def test_reasoning_effort_and_think(adapter: OllamaAdapter) -> None:
    assert chat(adapter, reasoning_effort="high")["think"] == "high"
    assert chat(adapter, reasoning_effort="none")["think"] is False
    assert chat(adapter, think=True)["think"] is True
    assert "think" not in chat(adapter)


def test_completion_request_is_raw_generate(adapter: OllamaAdapter) -> None:
    request = adapter.request("completions", {"model": "p", "prompt": ["Once"], "max_tokens": 4, "suffix": "end",
                                              "stream": True, "stream_options": {"include_usage": True}}, "llama3.2:1b")
    assert request.path == "/api/generate"
    assert request.body == {"model": "llama3.2:1b", "stream": True, "prompt": "Once", "raw": True, "suffix": "end",
                            "options": {"num_predict": 4, "num_ctx": 2048}}
    for params, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"echo": True}, "echo"),
                          ({"best_of": 2}, "best_of"), ({"logprobs": 2}, "logprobs")):
        with pytest.raises(InvalidRequest) as info:
            adapter.request("completions", {"model": "p", "prompt": "x", **params}, "m")
        assert info.value.param == param


def test_embed_request(adapter: OllamaAdapter) -> None:
    request = adapter.request("embeddings", {"model": "p", "input": ["a", "b"], "dimensions": 4,
                                             "encoding_format": "base64"}, "nomic-embed-text")
    assert request.path == "/api/embed"
    assert request.body == {"model": "nomic-embed-text", "input": ["a", "b"], "truncate": False, "dimensions": 4,
                            "options": {"num_ctx": 2048}}
    with pytest.raises(InvalidRequest) as info:
        adapter.request("embeddings", {"model": "p", "input": [[1, 2]]}, "m")
    assert info.value.param == "input"


def test_embed_request_never_streams(adapter: OllamaAdapter) -> None:
    request = adapter.request("embeddings", {"model": "p", "input": "a", "stream": True,
                                             "stream_options": {"include_usage": True}}, "nomic-embed-text")
    assert "stream" not in request.body and "stream_options" not in request.body  # /api/embed has neither


# --- responses: native -> OpenAI ---------------------------------------------------------------


def done(**extra: object) -> dict:
    return {"model": "llama3.2:1b", "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
            "total_duration": 5, "prompt_eval_count": 11, "eval_count": 4, **extra}


def test_chat_response(adapter: OllamaAdapter) -> None:
    raw = done(message={"role": "assistant", "content": "Hello there.", "thinking": "hmm"})
    reply = adapter.response("chat", json.dumps(raw).encode())
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert isinstance(reply["created"], int)
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello there.",
                                                         "reasoning_content": "hmm"},
                                 "logprobs": None, "finish_reason": "stop"}]
    assert reply["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    for reason, finish in (("length", "length"), ("load", "stop"), ("unload", "stop"), (None, "stop")):
        raw = done(done_reason=reason, message={"role": "assistant", "content": ""})
        assert adapter.response("chat", json.dumps(raw).encode())["choices"][0]["finish_reason"] == finish


def test_chat_response_with_tool_calls(adapter: OllamaAdapter) -> None:
    raw = done(message={"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]})
    choice = adapter.response("chat", json.dumps(raw).encode())["choices"][0]
    assert choice["finish_reason"] == "tool_calls"  # Ollama says "stop"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}  # a JSON string again


def test_missing_counts_are_zero_not_absent(adapter: OllamaAdapter) -> None:
    raw = {"model": "m", "done": True, "done_reason": "stop", "message": {"role": "assistant", "content": ""}}
    assert adapter.response("chat", json.dumps(raw).encode())["usage"] == \
        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # Go's omitempty drops zero counts


def test_completion_response(adapter: OllamaAdapter) -> None:
    reply = adapter.response("completions", json.dumps(done(response=" upon a time", done_reason="length",
                                                            context=[1, 2])).encode())
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    assert reply["choices"] == [{"index": 0, "text": " upon a time", "logprobs": None, "finish_reason": "length"}]
    assert reply["usage"]["total_tokens"] == 15


def test_embeddings_response_float_and_base64(adapter: OllamaAdapter) -> None:
    raw = json.dumps({"model": "nomic-embed-text", "embeddings": [[0.5, -0.25], [1.0, 0.0]], "prompt_eval_count": 3}).encode()
    reply = adapter.response("embeddings", raw, {"input": ["a", "b"]})
    assert reply == {"object": "list", "model": "nomic-embed-text",
                     "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]},
                              {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}],
                     "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    encoded = adapter.response("embeddings", raw, {"encoding_format": "base64"})["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (0.5, -0.25)


# --- streams: NDJSON -> OpenAI chunks ----------------------------------------------------------


def piece(content: str = "", **message: object) -> dict:
    return {"model": "llama3.2:1b", "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": content, **message}, "done": False}


async def test_chat_stream(adapter: OllamaAdapter) -> None:
    chunks = await collect(adapter, "chat", piece(thinking="hmm"), piece("Hel"), piece("lo"), "",
                           done(message={"role": "assistant", "content": ""}, done_reason="length"))
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"reasoning_content": "hmm"}, {"content": "Hel"}, {"content": "lo"}, {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "length"]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[0] and chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 4,
                                                                 "total_tokens": 15}


async def test_chat_stream_with_tool_calls(adapter: OllamaAdapter) -> None:
    chunks = await collect(adapter, "chat",
                           piece(tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
                           piece(tool_calls=[{"function": {"name": "get_time", "arguments": {}}}]),
                           done(message={"role": "assistant", "content": ""}))
    first, second = chunks[1]["choices"][0]["delta"]["tool_calls"], chunks[2]["choices"][0]["delta"]["tool_calls"]
    assert first[0]["index"] == 0 and second[0]["index"] == 1
    assert first[0]["id"].startswith("call_") and first[0]["type"] == "function"
    assert json.loads(first[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_completion_stream(adapter: OllamaAdapter) -> None:
    line = {"model": "m", "created_at": "x", "response": " upon", "done": False}
    chunks = await collect(adapter, "completions", line, done(response="", done_reason="stop"))
    assert [c["choices"][0]["text"] for c in chunks] == [" upon", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["prompt_tokens"] == 11
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)


async def test_error_line_mid_stream_raises_an_openai_error(adapter: OllamaAdapter) -> None:
    stream = adapter.stream("chat", _lines(piece("Hel"), {"error": "an error was encountered while running the model"}))
    seen = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2  # the role chunk and "Hel" went out before the error
    assert info.value.status == 500 and info.value.type == "server_error"
    assert info.value.body()["error"]["message"] == "an error was encountered while running the model"


async def test_a_stream_cut_short_is_an_error(adapter: OllamaAdapter) -> None:
    with pytest.raises(UpstreamError, match="closed the stream"):
        await collect(adapter, "chat", piece("Hel"))
    with pytest.raises(UpstreamError, match="not JSON"):
        await collect(adapter, "chat", "404 page not found")


async def _lines(*objs: dict):
    for obj in objs:
        yield json.dumps(obj).encode() + b"\n"


# --- errors, probes, launch, setup ---------------------------------------------------------------


def test_errors(adapter: OllamaAdapter) -> None:
    err = adapter.error(400, b'{"error":"illegal base64 data at input byte 4"}')
    assert (err.status, err.type, err.message) == (400, "invalid_request_error", "illegal base64 data at input byte 4")
    err = adapter.error(404, b'{"error":"model \\"qwen2.5:0.5b\\" not found, try pulling it first"}')
    assert (err.status, err.code) == (503, "model_not_installed")  # listed but not pulled: not the client's fault
    err = adapter.error(503, b'{"error":"server busy, please try again.  maximum pending requests exceeded"}')
    assert (err.status, err.type) == (503, "server_error")
    err = adapter.error(404, b"404 page not found")
    assert (err.status, err.message) == (404, "404 page not found")
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_health(adapter: OllamaAdapter) -> None:
    assert adapter.health_path == "/"
    assert adapter.health(200, b"Ollama is running") is Health.READY
    assert adapter.health(500, b"") is Health.BROKEN


def test_launch(adapter: OllamaAdapter) -> None:
    launch = adapter.launch(BACKEND, 41234)
    assert launch.argv == ["/opt/ollama", "serve"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "1", "OLLAMA_NUM_PARALLEL": "3", "OLLAMA_CONTEXT_LENGTH": "2048",
                          "OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_HOST": "127.0.0.1:41234"}  # the gateway's address wins
    assert adapter.version_command(BACKEND).argv == ["/opt/ollama", "--version"]


def test_launch_without_binary_says_what_to_do(adapter: OllamaAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="ollama not found.*binary"):
        adapter.launch(BACKEND.model_copy(update={"binary": None}), 1)


def test_setup_pulls_every_served_model(adapter: OllamaAdapter) -> None:
    pulls = adapter.setup_commands(BACKEND, "http://127.0.0.1:41234")
    assert [p.argv for p in pulls] == [["/opt/ollama", "pull", "llama3.2:1b"], ["/opt/ollama", "pull", "qwen2.5:0.5b"]]
    assert all(p.env["OLLAMA_HOST"] == "127.0.0.1:41234" for p in pulls)
    attached = BackendConfig(name="a", runtime="ollama", url="http://gpu-box:11434", serves=["llama3.2"])
    assert adapter.setup_commands(attached, "http://gpu-box:11434") == []


def test_missing_models_from_tags(adapter: OllamaAdapter) -> None:
    tags = {"models": [{"name": "llama3.2:1b", "model": "llama3.2:1b"}, {"name": "phi:latest", "model": "phi:latest"}]}
    assert adapter.missing_models(BACKEND, 200, json.dumps(tags).encode()) == ["qwen2.5:0.5b"]
    untagged = BACKEND.model_copy(update={"serves": ["phi", "llama3.2:1b"]})
    assert adapter.missing_models(untagged, 200, json.dumps(tags).encode()) == []  # "phi" means "phi:latest"
    assert adapter.missing_models(BACKEND, 500, b"") == ["llama3.2:1b", "qwen2.5:0.5b"]

