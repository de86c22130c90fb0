"""The whole path against a real llama-server the gateway spawned, through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers import GatewayProcess

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def api_key(llama_gateway: GatewayProcess) -> str:
    return llama_gateway.new_key(name="e2e")


@pytest.fixture(scope="module")
def client(llama_gateway: GatewayProcess, api_key: str) -> openai.OpenAI:
    return llama_gateway.openai(api_key)


@pytest.fixture(scope="module")
def http(llama_gateway: GatewayProcess, api_key: str) -> Iterator[httpx.Client]:
    with llama_gateway.http(api_key) as session:
        yield session


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.model == "gemma3-270m"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_alias_answers_with_the_name_asked(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=4)
    assert reply.model == "gpt-4o-mini"
    assert "gguf" not in reply.model_dump_json()  # never the model file's path


def test_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=8, stream=True))
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" and c.model == "gemma3-270m" for c in chunks)
    assert all(c.usage is None for c in chunks), "usage sent although the client did not ask"
    assert all(c.choices for c in chunks), "a usage-only chunk leaked to a client that did not ask"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="gemma3-270m", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True},
    ))
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert 0 < last.usage.completion_tokens <= 6 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content)


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=5)
    assert reply.model == "gemma3-270m" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    streamed = list(client.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    assert streamed[-1].usage is not None


def test_a_stream_of_several_choices_counts_them_all(client: openai.OpenAI) -> None:
    # llama-server reports usage once per choice; the client gets (and the key is charged) the sum.
    alone = client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=4)
    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=4, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    usage = chunks[-1].usage
    assert finished == {0: "length", 1: "length"}, finished  # each ran to max_tokens: 4 tokens each
    assert usage is not None and usage.completion_tokens == 8, usage
    assert alone.usage is not None and usage.prompt_tokens == alone.usage.prompt_tokens  # one prompt, once

    prompts = ["The sky is", "Once upon a time there was"]
    each = [client.completions.create(model="gemma3-270m", prompt=p, max_tokens=3).usage for p in prompts]
    listed = list(client.completions.create(model="gemma3-270m", prompt=prompts, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in listed if c.choices and c.choices[0].finish_reason}
    usage = listed[-1].usage
    assert finished == {0: "length", 1: "length"}, finished
    assert usage is not None and usage.completion_tokens == 6, usage
    assert usage.prompt_tokens == sum(u.prompt_tokens for u in each if u is not None), (usage, each)


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="gemma3-270m", input=["red", "blue"])
    assert reply.model == "gemma3-270m"
    assert len(reply.data) == 2 and len(reply.data[0].embedding) > 10
    assert reply.usage.prompt_tokens > 0


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m.owned_by for m in client.models.list()}
    assert models == {"gemma3-270m": "llamacpp", "gpt-4o-mini": "llamacpp"}
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_health_and_ready(llama_gateway: GatewayProcess) -> None:
    assert httpx.get(llama_gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(llama_gateway.url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["backends"]["gemma"]["state"] == "ready"


# --- errors: always the OpenAI shape, always the right status ------------------------------


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b'{"model": "gemma3-270m", "messages": [',
                   headers={"content-type": "application/json"})
    error = _error(r, 400)
    assert error["type"] == "invalid_request_error" and "not valid JSON" in str(error["message"])


def test_wrong_type_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, extra_body={"temperature": "hot"})
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3-270m", messages=[{"role": "robot", "content": "x"}])
    assert info.value.param == "messages[0].role"


def test_missing_field_is_400(http: httpx.Client) -> None:
    error = _error(http.post("/v1/chat/completions", json={"model": "gemma3-270m"}), 400)
    assert error["param"] == "messages"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert "`gpt-5` does not exist" in info.value.message


def test_body_over_max_body_is_413(http: httpx.Client) -> None:
    big = b'{"model":"gemma3-270m","messages":[{"role":"user","content":"' + b"a" * 100_000 + b'"}]}'
    error = _error(http.post("/v1/chat/completions", content=big), 413)
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: the bound holds on the bytes actually read
        yield big[:1000]
        yield big[1000:]

    _error(http.post("/v1/chat/completions", content=chunked()), 413)


def test_unknown_path_and_method(http: httpx.Client) -> None:
    assert _error(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert _error(http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    preflight = http.options("/v1/embeddings")
    assert preflight.status_code == 204 and "POST" in preflight.headers["allow"]


def test_upstream_error_keeps_its_status(http: httpx.Client) -> None:
    # 1024 context tokens per slot: a prompt far past it is refused by llama-server itself.
    long_prompt = "word " * 3000
    r = http.post("/v1/chat/completions",
                  json={"model": "gemma3-270m", "messages": [{"role": "user", "content": long_prompt}]})
    error = _error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["message"]
