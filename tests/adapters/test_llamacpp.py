"""llama.cpp's adapter without a server: the three generations of streaming usage, both forms of
a mid-stream error, `timings` and the build tag stripped, /slots as the load report."""

from __future__ import annotations

import json

import pytest

from adapters import for_runtime
from adapters.base import Load
from adapters.llamacpp import LlamaCppAdapter
from gateway.config import BackendConfig
from gateway.errors import UpstreamError
from tests.adapters.helpers import collect, sse

BACKEND = BackendConfig(name="g", runtime="llamacpp", model="/m/gemma.gguf", serves=["gemma"], slots=2, context=1024,
                        embeddings=True, binary="/opt/llama-server")
TIMINGS = {"prompt_n": 5, "prompt_ms": 8.1, "predicted_n": 2, "predicted_ms": 30.0, "predicted_per_second": 66.0}
USAGE = {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}}
CLEAN_USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


@pytest.fixture
def adapter() -> LlamaCppAdapter:
    made = for_runtime("llamacpp", BACKEND)
    assert isinstance(made, LlamaCppAdapter)
    return made


def test_launch_with_embeddings(adapter: LlamaCppAdapter) -> None:
    argv = adapter.launch(BACKEND, 40002).argv
    assert argv[:3] == ["/opt/llama-server", "-m", "/m/gemma.gguf"]
    assert argv[argv.index("-c") + 1] == "2048" and argv[argv.index("-np") + 1] == "2"
    assert {"--metrics", "--slots", "--embeddings"} <= set(argv)
    assert argv[argv.index("--pooling") + 1] == "mean"


def test_launch_passes_the_api_key_in_the_environment(adapter: LlamaCppAdapter) -> None:
    backend = BACKEND.model_copy(update={"api_key": "k-1", "env": {"LLAMA_API_KEY": "other", "X": "1"}})
    launch = adapter.launch(backend, 40002)
    # Not on the command line, which every local user can read; the configured key wins.
    assert "k-1" not in launch.argv and "--api-key" not in launch.argv
    assert launch.env == {"LLAMA_API_KEY": "k-1", "X": "1"}
    assert "LLAMA_API_KEY" not in adapter.launch(BACKEND, 40002).env


def chunk(delta: dict | None, finish: str | None = None, **extra: object) -> dict:
    choices = [] if delta is None else [{"finish_reason": finish, "index": 0, "delta": delta}]
    return {"choices": choices, "created": 1, "id": "chatcmpl-x", "model": "gemma", "system_fingerprint": "b6000-abc",
            "object": "chat.completion.chunk", **extra}


ROLE = chunk({"role": "assistant", "content": None})
TOKEN = chunk({"content": "Hi"})

# The three places usage has lived in llama.cpp's streams (see shared/reference/runtimes.md).
GENERATIONS = {
    "1: on the finish chunk": [ROLE, TOKEN, chunk({}, "stop", usage=USAGE, timings=TIMINGS)],
    "2: a choices:[] chunk, always": [ROLE, TOKEN, chunk({}, "stop"), chunk(None, usage=USAGE, timings=TIMINGS)],
    "3: a choices:[] chunk on include_usage": [ROLE, TOKEN, chunk({}, "stop", timings=TIMINGS),
                                              chunk(None, usage=USAGE, timings=TIMINGS)],
}


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_every_generation_of_streaming_usage(adapter: LlamaCppAdapter, generation: str) -> None:
    lines = [": keep-alive comment"] + [x for c in GENERATIONS[generation] for x in (sse(c), "")] + [sse("[DONE]")]
    chunks = await collect(adapter, "chat", *lines)
    usages = [c["usage"] for c in chunks if "usage" in c]
    assert usages == [CLEAN_USAGE]  # exactly one usage, in the OpenAI shape, wherever it came
    with_choices = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["delta"] for c in with_choices] == [{"role": "assistant", "content": ""},
                                                                 {"content": "Hi"}, {}]
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("timings" not in c and c["system_fingerprint"] is None for c in chunks)
    assert all(c["choices"][0]["logprobs"] is None for c in with_choices)  # the OpenAI key is always there


def _report(prompt: int, completion: int) -> dict:
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


async def test_usage_reported_per_choice_is_summed(adapter: LlamaCppAdapter) -> None:
    # As a real llama-server streamed them (captured): chat with n=2 sends one `choices: []`
    # usage chunk per choice, both with the one prompt; a completion of a prompt list puts each
    # prompt's usage on its own finish chunk. The last usage the core sees is the total.
    def choice(index: int, delta: dict, finish: str | None = None, **extra: object) -> dict:
        return {**chunk(delta, finish, **extra), "choices": [{"finish_reason": finish, "index": index, "delta": delta}]}

    chat = [choice(0, {"content": "a"}), choice(1, {"content": "b"}), choice(0, {}, "length"),
            chunk(None, usage=_report(25, 3)), choice(1, {}, "length"), chunk(None, usage=_report(25, 2))]
    lines = [x for c in chat for x in (sse(c), "")] + [sse("[DONE]")]
    usages = [c["usage"] for c in await collect(adapter, "chat", *lines) if "usage" in c]
    assert usages[-1] == {"prompt_tokens": 25, "completion_tokens": 5, "total_tokens": 30}

    def text(index: int, piece: str, finish: str | None = None, **extra: object) -> dict:
        return {"choices": [{"text": piece, "index": index, "logprobs": None, "finish_reason": finish}],
                "created": 1, "id": "cmpl-x", "model": "gemma", "object": "text_completion", **extra}

    listed = [text(1, " the"), text(0, " @"), text(1, "", "length", usage=_report(4, 3)),
              text(0, "ill"), text(0, "", "length", usage=_report(2, 3))]
    lines = ["data: null", ""] + [x for c in listed for x in (sse(c), "")] + [sse("[DONE]")]
    usages = [c["usage"] for c in await collect(adapter, "completions", *lines) if "usage" in c]
    assert usages[-1] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}


async def test_old_error_line_mid_stream(adapter: LlamaCppAdapter) -> None:
    error = {"code": 500, "message": "failed to decode", "type": "server_error"}
    with pytest.raises(UpstreamError) as info:
        await collect(adapter, "chat", sse(ROLE), "error: " + json.dumps(error), sse("[DONE]"))
    assert (info.value.status, info.value.message, info.value.type) == (500, "failed to decode", "server_error")


async def test_new_error_event_mid_stream(adapter: LlamaCppAdapter) -> None:
    error = {"error": {"code": 400, "message": "the request exceeds the available context size",
                       "type": "exceed_context_size_error", "n_prompt_tokens": 3000, "n_ctx": 1024}}
    with pytest.raises(UpstreamError) as info:
        await collect(adapter, "chat", sse(ROLE), sse(error))  # and no [DONE]
    assert (info.value.status, info.value.type, info.value.code) == (400, "invalid_request_error",
                                                                     "context_length_exceeded")


def test_loading_error_and_errors_without_param(adapter: LlamaCppAdapter) -> None:
    err = adapter.error(503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
    assert (err.status, err.type, err.message) == (503, "server_error", "Loading model")
    err = adapter.error(501, b'{"error":{"code":501,"message":"This server does not support embeddings.",'
                             b'"type":"not_supported_error"}}')
    assert (err.status, err.param) == (501, None)


def test_response_drops_timings_and_build_tag(adapter: LlamaCppAdapter) -> None:
    raw = {"choices": [{"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": "Hi"}}],
           "created": 1, "model": "gemma", "system_fingerprint": "b6000-abc", "object": "chat.completion",
           "usage": USAGE, "id": "chatcmpl-x", "timings": TIMINGS}
    reply = adapter.response("chat", json.dumps(raw).encode())
    assert reply == {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gemma",
                     "system_fingerprint": None, "usage": CLEAN_USAGE,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "logprobs": None,
                                  "finish_reason": "length"}]}


def test_embeddings_response(adapter: LlamaCppAdapter) -> None:
    raw = {"model": "gemma", "object": "list", "usage": {"prompt_tokens": 4, "total_tokens": 4},
           "data": [{"embedding": [0.1, 0.2], "index": 0, "object": "embedding"}]}
    assert adapter.response("embeddings", json.dumps(raw).encode()) == raw


def test_load_from_slots(adapter: LlamaCppAdapter) -> None:
    assert adapter.load_path == "/slots"
    slots = [{"id": 0, "n_ctx": 1024, "is_processing": True}, {"id": 1, "n_ctx": 1024, "is_processing": False},
             {"id": 2, "n_ctx": 1024, "is_processing": True}]
    assert adapter.load(200, json.dumps(slots).encode()) == Load(running=2.0)
    assert adapter.load(501, b'{"error":{"message":"This server does not support slots endpoint."}}') is None
    assert adapter.load(200, b"not json") is None


async def test_stream_cut_off_without_done_is_an_error(adapter: LlamaCppAdapter) -> None:
    with pytest.raises(UpstreamError) as info:
        await collect(adapter, "chat", sse(ROLE), sse(chunk({"content": "half an ans"})))  # the runtime died
    assert info.value.status == 502 and "before it finished" in info.value.message


@pytest.mark.parametrize("message", ["image input is not supported - hint: if this is unexpected, you may need "
                                     "to provide the mmproj", "audio input is not supported",
                                     "Failed to parse messages: [json.exception.out_of_range.403] key 'text' not found"])
def test_the_requests_own_faults_answered_500_are_a_400(adapter: LlamaCppAdapter, message: str) -> None:
    # As llama-server answers them: a 500 would be retried by the SDKs and cool the backend down.
    err = adapter.error(500, json.dumps({"error": {"code": 500, "message": message, "type": "server_error"}}).encode())
    assert (err.status, err.type, err.param, err.message) == (400, "invalid_request_error", "messages", message)


def test_a_500_of_its_own_stays_a_500(adapter: LlamaCppAdapter) -> None:
    err = adapter.error(500, b'{"error":{"code":500,"message":"failed to decode the batch","type":"server_error"}}')
    assert (err.status, err.type) == (500, "server_error")
