"""Request decoding: one decode, known fields type-checked, unknown fields kept for the runtime."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.openai import decode_request, wants_usage


def test_null_is_a_value_where_openai_allows_it() -> None:
    # OpenAI's schema says `boolean or null` for stream; SDKs and tools send explicit nulls.
    body = decode_request("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":null,'
                                  b'"stream_options":null,"max_tokens":null,"stop":null}')
    assert body["stream"] is None


def test_unknown_parameters_pass_through() -> None:
    body = decode_request("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":40,"min_p":0.1}')
    assert body["top_k"] == 40 and body["min_p"] == 0.1


@pytest.mark.parametrize(("endpoint", "body", "param", "fragment"), [
    ("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":3}', "temperature", "<= 2"),
    ("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}', "stop", None),
    ("chat", b'{"model":1,"messages":[{"role":"user","content":"hi"}]}', "model", "str"),
    ("chat", b'{"model":"m","messages":[{"content":"hi"}]}', "messages[0].role", "role"),
    ("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":"yes"}', "stream", "bool"),
    ("chat", b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}',
     "tools[0].function", "function"),
    ("completions", b'{"model":"m"}', "prompt", "Missing"),
    ("embeddings", b'{"model":"m","input":{"a":1}}', "input", None),
    ("embeddings", b'{"model":"m","input":"x","encoding_format":"hex"}', "encoding_format", None),
    ("embeddings", b'{"model":"m","input":[]}', "input", "length >= 1"),
    ("embeddings", b'{"model":"m","input":""}', "input", "length >= 1"),
    ("embeddings", b'{"model":"m","input":["a",""]}', "input[1]", "length >= 1"),
    ("embeddings", b'{"model":"m","input":[[1],[]]}', "input[1]", "length >= 1"),
])
def test_invalid_fields_are_named(endpoint: str, body: bytes, param: str, fragment: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(endpoint, body)  # type: ignore[arg-type]
    assert info.value.status == 400
    assert info.value.param == param
    if fragment:
        assert fragment in info.value.message


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"x"', b"{", b"\xff"])
def test_not_an_object(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        decode_request("chat", body)


def test_wants_usage() -> None:
    assert wants_usage({"stream_options": {"include_usage": True}})
    assert not wants_usage({"stream_options": None})
    assert not wants_usage({})
