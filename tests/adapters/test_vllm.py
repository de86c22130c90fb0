"""vLLM's adapter without a server: launch, readiness, its error shapes, reasoning, stop_reason,
the split finish chunk, and /metrics under the old and new gauge names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters import for_runtime
from adapters.base import Health, Load
from adapters.vllm import VllmAdapter
from gateway.config import BackendConfig
from tests.adapters.helpers import collect, sse
from tests.helpers import FAKES

BACKEND = BackendConfig(name="v", runtime="vllm", model="Qwen/Qwen3-0.6B", serves=["qwen3", "small"], slots=8,
                        context=8192, gpus="0,1", api_key="k-1", env={"VLLM_LOGGING_LEVEL": "DEBUG"},
                        args=["--max-num-seqs", "4", "--enforce-eager"], binary="/opt/vllm/bin/vllm")


@pytest.fixture
def adapter() -> VllmAdapter:
    made = for_runtime("vllm", BACKEND)
    assert isinstance(made, VllmAdapter)
    return made


def test_launch(adapter: VllmAdapter) -> None:
    launch = adapter.launch(BACKEND, 40001)
    assert launch.argv == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen3-0.6B", "--host", "127.0.0.1", "--port", "40001",
                           "--served-model-name", "qwen3", "small", "--max-num-seqs", "8", "--max-model-len", "8192",
                           "--max-num-seqs", "4", "--enforce-eager"]  # operator's args last
    # The key in vLLM's own variable, not on the command line, which every local user can read.
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_API_KEY": "k-1"}
    assert adapter.version_command(BACKEND).argv == ["/opt/vllm/bin/vllm", "--version"]


def test_launch_argv_is_accepted_by_the_fake(adapter: VllmAdapter) -> None:
    """The argv parses with the fake's argparse (vLLM's flags): no flag the real CLI would refuse."""
    backend = BACKEND.model_copy(update={"binary": [sys.executable, str(FAKES / "fake_vllm.py")], "args": []})
    argv = adapter.launch(backend, 40001).argv
    code = f"import sys; sys.path.insert(0, {str(FAKES)!r}); import fake_vllm; print(fake_vllm.parse_args({argv[2:]!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "served_model_name=['qwen3', 'small']" in out and "max_model_len=8192" in out


def test_the_configured_key_wins_over_one_in_the_backends_env(adapter: VllmAdapter) -> None:
    backend = BACKEND.model_copy(update={"env": {"VLLM_API_KEY": "other"}})
    assert adapter.launch(backend, 1).env["VLLM_API_KEY"] == "k-1"  # the key the gateway sends


def test_launch_without_binary(adapter: VllmAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="vllm not found"):
        adapter.launch(BACKEND.model_copy(update={"binary": None}), 1)


def test_health(adapter: VllmAdapter) -> None:
    assert adapter.health(200, b"") is Health.READY
    assert adapter.health(503, b"") is Health.BROKEN  # the engine died; it does not come back by itself


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, {"error": {"message": "temperature must be in [0, 2], got 5.0.", "type": "BadRequestError",
                     "param": "temperature", "code": 400}},
     (400, "invalid_request_error", "temperature", None, "temperature must be in [0, 2], got 5.0.")),
    (400, {"object": "error", "message": "bad stop", "type": "BadRequestError", "param": "stop", "code": 400},
     (400, "invalid_request_error", "stop", None, "bad stop")),
    (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None, "code": 404}},
     (404, "not_found_error", None, None, "The model `x` does not exist.")),
    (404, {"detail": "Not Found"}, (404, "not_found_error", None, None, "Not Found")),
    (400, {"error": {"message": "This model's maximum context length is 1024 tokens. However, your request has "
                                "3000 input tokens.", "type": "BadRequestError", "param": None, "code": 400}},
     (400, "invalid_request_error", None, "context_length_exceeded", None)),
    (401, {"error": "Unauthorized"},  # the gateway's own key for vLLM was refused: not the client's fault
     (502, "server_error", None, "upstream_auth_failed", None)),
    (500, {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "param": None,
                     "code": 500}}, (500, "server_error", None, None, "EngineCore encountered an issue.")),
])
def test_error_shapes_become_the_openai_error(adapter: VllmAdapter, status: int, body: dict, expected: tuple) -> None:
    err = adapter.error(status, json.dumps(body).encode())
    got = (err.status, err.type, err.param, err.code, err.message)
    assert got[:4] == expected[:4]
    if expected[4] is not None:
        assert got[4] == expected[4]
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_error_in_a_stream_takes_the_status_from_its_code(adapter: VllmAdapter) -> None:
    err = adapter.error(None, b'{"error":{"message":"boom","type":"InternalServerError","param":null,"code":503}}')
    assert (err.status, err.type) == (503, "server_error")


def vllm_reply(message: dict) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen3",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop", "stop_reason": "###",
                     "token_ids": None}],
        "service_tier": None, "system_fingerprint": None, "prompt_logprobs": None, "prompt_token_ids": None,
        "kv_transfer_params": None,
        "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None},
    }).encode()


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_reasoning_is_one_field_and_stop_reason_goes(adapter: VllmAdapter, key: str) -> None:
    message = {"role": "assistant", "content": "Hi", "refusal": None, "annotations": None, "audio": None,
               "function_call": None, "tool_calls": [], key: "thinking..."}
    reply = adapter.response("chat", vllm_reply(message))
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi",
                                                         "reasoning_content": "thinking..."},
                                 "logprobs": None, "finish_reason": "stop"}]
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_no_reasoning_means_no_field(adapter: VllmAdapter) -> None:
    reply = adapter.response("chat", vllm_reply({"role": "assistant", "content": "Hi", "reasoning": None,
                                                 "tool_calls": []}))
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}


def test_completion_response_drops_stop_reason(adapter: VllmAdapter) -> None:
    raw = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "qwen3",
                      "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                                   "stop_reason": None, "prompt_logprobs": None}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
    assert adapter.response("completions", raw)["choices"] == [
        {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}]


def chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish:
        choice["stop_reason"] = None
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen3", "choices": [choice],
            **extra}


async def test_stream_reasoning_stop_reason_and_the_split_finish(adapter: VllmAdapter) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": None}
    chunks = await collect(
        adapter, "chat",
        sse(chunk({"role": "assistant", "content": ""})), "",
        sse(chunk({"reasoning": "hm"})), "",
        sse(chunk({"content": "Hi"}, "stop")), "",  # vLLM: the last token and finish_reason together
        sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen3", "choices": [],
             "usage": usage}), "",
        sse("[DONE]"),
    )
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) if c["choices"] else c["usage"]
            for c in chunks] == [
        ({"role": "assistant", "content": ""}, None),
        ({"reasoning_content": "hm"}, None),
        ({"content": "Hi"}, None),
        ({}, "stop"),
        {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    ]
    assert all("stop_reason" not in json.dumps(c) for c in chunks)


async def test_completion_stream_split_finish(adapter: VllmAdapter) -> None:
    line = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "qwen3",
            "choices": [{"index": 0, "text": " end", "logprobs": None, "finish_reason": "length", "stop_reason": None}]}
    chunks = await collect(adapter, "completions", sse(line), sse("[DONE]"))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [(" end", None), ("", "length")]


async def test_mid_stream_error(adapter: VllmAdapter) -> None:
    error = {"error": {"message": "Injected engine failure", "type": "InternalServerError", "param": None, "code": 500}}
    stream = adapter.stream("chat", _agen(sse(chunk({"content": "a"})), sse(error), sse("[DONE]")))
    got = []
    with pytest.raises(Exception) as info:
        async for c in stream:
            got.append(c)
    assert len(got) == 1
    assert getattr(info.value, "status", None) == 500 and "Injected" in str(info.value)


async def _agen(*lines: str):
    for line in lines:
        yield line.encode() + b"\n"


METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="qwen3"}} 3.0
vllm:num_requests_running{{engine="1",model_name="qwen3"}} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="qwen3"}} 2.0
# HELP {cache} KV-cache usage. 1 means 100 percent usage.
# TYPE {cache} gauge
{cache}{{engine="0",model_name="qwen3"}} 0.25
{cache}{{engine="1",model_name="qwen3"}} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="qwen3"}} 100.0
"""


@pytest.mark.parametrize("cache", ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"])
def test_metrics_new_and_old_names(adapter: VllmAdapter, cache: str) -> None:
    assert adapter.load_path == "/metrics"
    load = adapter.load(200, METRICS.format(cache=cache).encode())
    assert load == Load(running=4.0, waiting=2.0, kv_cache_usage_ratio=0.5)


def test_metrics_new_name_wins_and_garbage_is_no_report(adapter: VllmAdapter) -> None:
    both = METRICS.format(cache="vllm:kv_cache_usage_perc") + METRICS.format(
        cache="vllm:gpu_cache_usage_perc").split("# HELP vllm:num_requests_waiting")[0].replace(
        "vllm:num_requests_running", "vllm:gpu_cache_usage_perc").replace(" 3.0", " 0.9").replace(" 1.0", " 0.9")
    assert adapter.load(200, both.encode()).kv_cache_usage_ratio == 0.5
    assert adapter.load(200, b"# nothing here\n") is None
    assert adapter.load(503, b"") is None


async def test_the_split_finish_keeps_the_last_tokens_logprobs_once(adapter: VllmAdapter) -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    last = chunk({"content": "Hi"}, "stop")
    last["choices"][0]["logprobs"] = logprobs  # vLLM: the last token, its logprobs and finish_reason together
    chunks = await collect(adapter, "chat", sse(last), "", sse("[DONE]"))
    assert [c["choices"][0]["logprobs"] for c in chunks] == [logprobs, None]  # a client joining them gets one
