"""The passthrough adapter: its reading of runtime error bodies, whatever their fields hold, and
the stream fields of the requests it sends."""

from __future__ import annotations

import json

import pytest

from adapters import for_runtime
from adapters.base import Adapter
from gateway.errors import UpstreamError


@pytest.mark.parametrize(("param", "code", "expected"), [
    (5, 7, ("5", "7")),  # numbers become the strings the OpenAI format has
    (1.5, "bad", ("1.5", "bad")),
    ({"a": 1}, [1], (None, None)),  # objects and lists: nothing a client could branch on
    (True, False, (None, None)),
    ("temperature", 400, ("temperature", None)),  # an int code that is the HTTP status says nothing more
])
def test_param_and_code_are_nullable_strings(param: object, code: object, expected: tuple) -> None:
    err = Adapter().error(400, json.dumps({"error": {"message": "m", "type": "X", "param": param, "code": code}}).encode())
    assert (err.param, err.code) == expected
    assert (err.status, err.type) == (400, "invalid_request_error")


@pytest.mark.parametrize("kind", [{"a": 1}, ["server_error"], 5])
def test_an_error_type_that_is_not_a_string_comes_from_the_status(kind: object) -> None:
    err = Adapter().error(503, json.dumps({"error": {"message": "m", "type": kind}}).encode())
    assert (err.status, err.type) == (503, "server_error")


def test_an_int_code_in_a_stream_error_is_its_status() -> None:
    err = Adapter().error(None, b'{"error": {"message": "busy", "code": 503}}')
    assert (err.status, err.code) == (503, None)
    err = Adapter().error(None, b'{"error": {"message": "odd", "code": 7}}')
    assert (err.status, err.code) == (500, "7")


@pytest.mark.parametrize("runtime", ["openai", "vllm", "llamacpp"])
@pytest.mark.parametrize("stream", [True, False])
def test_embeddings_go_upstream_without_stream_fields(runtime: str, stream: bool) -> None:
    # Embeddings never stream: the gateway answers them with one JSON object whatever `stream` says.
    body = {"model": "public", "input": ["a"], "stream": stream, "stream_options": {"include_usage": True},
            "dimensions": 8}
    request = for_runtime(runtime).request("embeddings", body, "served")
    assert request.path == "/v1/embeddings"
    assert request.body == {"model": "served", "input": ["a"], "dimensions": 8}
    assert body["stream"] is stream and "stream_options" in body  # the client's dict is left as it came


@pytest.mark.parametrize("runtime", ["openai", "vllm", "llamacpp"])
def test_streamed_generation_still_asks_for_usage(runtime: str) -> None:
    adapter = for_runtime(runtime)
    for endpoint, field in (("chat", "messages"), ("completions", "prompt")):
        request = adapter.request(endpoint, {"model": "p", field: "x", "stream": True,
                                             "stream_options": {"include_usage": False}}, "served")
        assert request.body["stream"] is True and request.body["stream_options"] == {"include_usage": True}
        request = adapter.request(endpoint, {"model": "p", field: "x", "stream_options": {"include_usage": True}},
                                  "served")
        assert "stream_options" not in request.body


def test_a_reply_nested_past_the_stack_is_a_502_not_a_crash() -> None:
    # msgspec raises RecursionError, not DecodeError, for nesting deeper than the stack allows.
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    for decode in (lambda: Adapter().response("chat", deep),
                   lambda: Adapter().decoder("chat").feed(b"data: " + deep + b"\n\n", [])):
        with pytest.raises(UpstreamError) as caught:
            decode()
        assert caught.value.status == 502
