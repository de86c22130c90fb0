#!/usr/bin/env python3
"""Fake `vllm serve` for tests (follows shared/reference/runtimes.md, "vLLM").

    python tests/fakes/fake_vllm.py serve MODEL --host H --port N --served-model-name NAME [NAME2 ...]
        --max-num-seqs N [--max-model-len N] [--gpu-memory-utilization F] [--api-key K]
        [--enable-auto-tool-choice --tool-call-parser P]

Quirks reproduced on purpose ("a fake friendlier than the real runtime is a defect"):
- the port is bound at once but only listens after the "engine" loaded (FAKE_LOAD_SECONDS):
  connections are refused until then, and nobody else can take the port;
- a child "EngineCore" process is spawned at start; it survives a SIGKILL of this process
  (kill the process group); while it is dead, /health answers 503;
- `--api-key` / VLLM_API_KEY guard /v1/* only; failure is 401 {"error": "Unauthorized"};
- errors are {"error": {message, type, param, code}} (FAKE_VLLM_FLAT_ERRORS=1: the older flat
  {"object": "error", ...}); unknown routes answer FastAPI's {"detail": "Not Found"};
- the response `model` is the FIRST served name even when the request used an alias;
- usage in streams only with stream_options.include_usage, as a final "choices": [] chunk;
  mid-stream errors are a `data: {"error": ...}` event followed by `data: [DONE]`;
- the last content chunk carries finish_reason (no separate empty chunk); choices carry
  `stop_reason`; reasoning text goes to `reasoning` (FAKE_VLLM_OLD_REASONING=1: `reasoning_content`);
- tool_choice "auto" (the default when tools are given) is refused with 400 unless the server
  was started with --enable-auto-tool-choice and --tool-call-parser;
- a named tool_choice answers finish_reason "stop" (like OpenAI); "auto"/"required" say "tool_calls";
- /v1/completions defaults max_tokens to 16; requests longer than --max-model-len are a 400;
- /metrics uses vLLM's names; FAKE_VLLM_OLD_METRICS=1 gives gpu_cache_usage_perc instead of
  kv_cache_usage_perc.

Environment knobs: FAKE_LOAD_SECONDS (1.0), FAKE_TOKEN_DELAY (0.005), FAKE_CRASH_AFTER,
FAKE_OUTPUT_WORDS, FAKE_VLLM_FLAT_ERRORS, FAKE_VLLM_OLD_METRICS, FAKE_VLLM_REASONING,
FAKE_VLLM_OLD_REASONING, VLLM_API_KEY.  Magic prompt text: "FAKE_MIDSTREAM_ERROR" in the last user
message breaks a stream after 2 content chunks; "call the tool" triggers a tool call under "auto".
Test-only endpoints (not in vLLM): GET /fake/last_request returns the last inference request body;
GET /fake/stats -> {"peak_running": N, "running": N, "served": N, "peak_by_group": {G: N}} counts inference
requests in flight (from the handler's start to its end, streams included) and their peak, also per group
G = the x-request-id up to its first "." (ids without a dot are in no group); POST /fake/stats/reset
zeroes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager

from aiohttp import ClientConnectionResetError, web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find _text when imported too
import _text  # noqa: E402

VERSION = "0.33.0"
DEFAULT_MAX_MODEL_LEN = 4096
INFERENCE_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}

# The engine core child: logs one line, then idles until killed.  Like vLLM's EngineCore it does
# not notice that its parent died, so a SIGKILL of the API server leaves it orphaned.
ENGINE_CODE = (
    "import os, sys, time\n"
    "print(f'INFO [core.py:93] Initializing a V1 LLM engine (pid {os.getpid()})', file=sys.stderr, flush=True)\n"
    "while True: time.sleep(3600)\n"
)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def log(message: str, level: str = "INFO", where: str = "api_server.py:1") -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"{level} {stamp} [{where}] {message}", file=sys.stderr, flush=True)


class BadRequest(Exception):
    """A 400 with vLLM's error body; `param` names the offending field when vLLM does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Start the vLLM OpenAI compatible API server.")
    serve.add_argument("model_tag", nargs="?", default="Qwen/Qwen3-0.6B")
    serve.add_argument("--model", default=None)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--enable-auto-tool-choice", action="store_true")
    serve.add_argument("--tool-call-parser", default=None)
    # Real flags that change nothing in the fake but must not be rejected.
    serve.add_argument("--reasoning-parser", default=None)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument("--enforce-eager", action="store_true")
    serve.add_argument("--disable-log-requests", action="store_true")
    serve.add_argument("--enable-log-requests", action="store_true")
    serve.add_argument("--uvicorn-log-level", default="info")
    serve.add_argument("--chat-template", default=None)
    serve.add_argument("--download-dir", default=None)
    serve.add_argument("--max-num-batched-tokens", type=int, default=None)
    serve.add_argument("--quantization", "-q", default=None)
    # vLLM's FlexibleArgumentParser accepts --max_num_seqs as well as --max-num-seqs;
    # any other unknown flag is an argparse error (exit 2), as in vLLM.
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args([dash_flag(a) for a in argv])


def dash_flag(arg: str) -> str:
    """--max_num_seqs=4 -> --max-num-seqs=4 (values are left alone)."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value


# ---------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str, labels: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {float(count)}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        lines.append(f"{name}_count{{{labels}}} {float(self.count)}")
        lines.append(f"{name}_sum{{{labels}}} {self.sum}")
        return lines


LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]


# ---------------------------------------------------------------- server state


class FakeVllm:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = args.model or args.model_tag
        self.names = args.served_model_name or [self.model]
        self.max_model_len = args.max_model_len or DEFAULT_MAX_MODEL_LEN
        self.api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
        self.auto_tools = bool(args.enable_auto_tool_choice and args.tool_call_parser)
        self.created = int(time.time())
        self.token_delay = env_float("FAKE_TOKEN_DELAY", 0.005)
        crash_after = os.environ.get("FAKE_CRASH_AFTER")
        self.crash_after = int(crash_after) if crash_after not in (None, "") else None
        self.flat_errors = env_flag("FAKE_VLLM_FLAT_ERRORS")
        self.reasoning_key = "reasoning_content" if env_flag("FAKE_VLLM_OLD_REASONING") else "reasoning"
        self.reasoning = env_flag("FAKE_VLLM_REASONING") or env_flag("FAKE_VLLM_OLD_REASONING")
        self.slots = asyncio.Semaphore(args.max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success: Counter[str] = Counter({"stop": 0, "length": 0, "abort": 0})
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.served = 0
        self.inflight = 0  # /fake/stats
        self.peak_inflight = 0
        self.finished = 0
        self.group_inflight: Counter[str] = Counter()
        self.group_peak: Counter[str] = Counter()
        self.last_request: object = None
        self.engine: subprocess.Popen | None = None
        self.shutdown = asyncio.Event()
        self.exit_code = 0

    # -- engine child process

    def start_engine(self) -> None:
        self.engine = subprocess.Popen(
            [sys.executable, "-c", ENGINE_CODE, "VLLM::EngineCore_DP0"], stdin=subprocess.DEVNULL
        )

    def stop_engine(self) -> None:
        if self.engine and self.engine.poll() is None:
            self.engine.terminate()
            try:
                self.engine.wait(5)
            except subprocess.TimeoutExpired:
                self.engine.kill()

    def engine_dead(self) -> bool:
        return self.engine is not None and self.engine.poll() is not None

    # -- responses

    def error(self, status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
        return web.json_response(self.error_body(status, message, err_type, param), status=status)

    def error_body(self, status: int, message: str, err_type: str, param: str | None = None) -> dict:
        if self.flat_errors:  # vLLM before the nested OpenAI shape
            return {"object": "error", "message": message, "type": err_type, "param": param, "code": status}
        return {"error": {"message": message, "type": err_type, "param": param, "code": status}}

    def bad_request(self, exc: BadRequest) -> web.Response:
        return self.error(400, str(exc), "BadRequestError", exc.param)

    def model_not_found(self, name: str) -> web.Response:
        return self.error(404, f"The model `{name}` does not exist.", "NotFoundError")

    @asynccontextmanager
    async def slot(self):
        """Hold one of --max-num-seqs running slots; waiting requests show in the metrics."""
        queued_at = time.monotonic()
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.queue_time.observe(time.monotonic() - queued_at)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.slots.release()

    def record(self, prompt_tokens: int, completion_tokens: int, finish: str, started: float) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.generation_tokens_total += completion_tokens
        self.success[finish if finish in ("stop", "length") else "stop"] += 1
        self.e2e.observe(time.monotonic() - started)


# ---------------------------------------------------------------- request parsing helpers


async def read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Input should be a valid dictionary or object to extract fields from")
    return body


def message_text(content: object) -> str:
    """Text of an OpenAI message content: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise BadRequest("Invalid content part: each part needs a 'type'")
            if part["type"] == "text":
                texts.append(str(part.get("text", "")))
        return " ".join(texts)
    raise BadRequest("Input should be a valid string or list of content parts", "messages")


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise BadRequest("stop: Input should be a valid string or list of strings", "stop")
    if any(s == "" for s in stops):
        raise BadRequest("stop cannot contain an empty string.", "stop")
    return stops


def number(body: dict, key: str, default: float | None) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key}: Input should be a valid number", key)
    return value


def integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: Input should be a valid integer", key)
    return value


def check_sampling(body: dict) -> None:
    """vLLM's SamplingParams checks (same messages)."""
    temperature = float(number(body, "temperature", 1.0))
    if not math.isfinite(temperature):
        raise BadRequest(f"temperature must be a finite number, got {temperature}.", "temperature")
    if temperature < 0:
        raise BadRequest(f"temperature must be non-negative, got {temperature}.", "temperature")
    if temperature > 2:
        raise BadRequest(f"temperature must be in [0, 2], got {temperature}.", "temperature")
    top_p = float(number(body, "top_p", 1.0))
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    top_k = integer(body, "top_k", 0)
    if top_k < -1:
        raise BadRequest(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    for key in ("presence_penalty", "frequency_penalty"):
        value = float(number(body, key, 0.0))
        if not -2 <= value <= 2:
            raise BadRequest(f"{key} must be in [-2, 2], got {value}.", key)
    n = integer(body, "n", 1)
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}.", "n")
    integer(body, "seed", None)


def check_stream_options(body: dict) -> None:
    """vLLM refuses stream_options on a non-streamed request (a gateway must not always send it)."""
    if body.get("stream_options") and not body.get("stream"):
        raise BadRequest("Stream options can only be defined when `stream=True`.", "stream_options")


def max_tokens_of(body: dict, default: int | None) -> int | None:
    value = integer(body, "max_completion_tokens", None)
    if value is None:
        value = integer(body, "max_tokens", default)
    if value is not None and value < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {value}.", "max_tokens")
    return value


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """vLLM refuses prompts (plus max_tokens) over --max-model-len; returns the effective max_tokens."""
    if prompt_tokens >= max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise BadRequest(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens}).",
            "max_tokens",
        )
    return max_tokens if max_tokens is not None else max_model_len - prompt_tokens


# ---------------------------------------------------------------- chat planning


class ChoicePlan:
    """What one choice will say: reasoning pieces, content pieces or a tool call."""

    def __init__(self, index: int):
        self.index = index
        self.reasoning: list[str] = []
        self.content = _text.Generation()
        self.tool_call: dict | None = None  # {"id", "name", "arguments"}
        self.finish_reason = "stop"
        self.stop_reason: str | None = None

    @property
    def tokens(self) -> int:
        args = _text.count_tokens(self.tool_call["arguments"]) if self.tool_call else 0
        return len(self.reasoning) + self.content.tokens + args


def pick_tool(state: FakeVllm, body: dict, messages: list[dict]) -> tuple[dict | None, str]:
    """Return (tool to call or None, how it was chosen) following vLLM's tool_choice rules."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise BadRequest("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if not isinstance(tools, list) or any(not isinstance(t, dict) or "function" not in t for t in tools):
        raise BadRequest("tools: each tool needs a 'function'", "tools")
    if choice == "none":
        return None, "none"
    if choice == "auto":
        if not state.auto_tools:
            raise BadRequest(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )
        if "call the tool" in last_user_text(messages).lower():
            return tools[0], "auto"
        return None, "auto"
    if choice == "required":
        return tools[0], "required"
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for tool in tools:
            if tool["function"].get("name") == name:
                return tool, "named"
        raise BadRequest(f"Tool '{name}' has not been passed in `tools`.", "tool_choice")
    raise BadRequest(f"Invalid tool_choice: {choice!r}", "tool_choice")


def response_schema(body: dict) -> dict | None:
    """The JSON schema asked by response_format ({} for json_object), or None for text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format: type must be one of 'text', 'json_object', 'json_schema'", "response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("response_format.json_schema is required for type json_schema", "response_format")
    return spec.get("schema") or {}


def plan_chat(state: FakeVllm, body: dict, prompt: str, messages: list[dict], max_tokens: int) -> list[ChoicePlan]:
    stops = parse_stop(body)
    tool, mode = pick_tool(state, body, messages)
    schema = response_schema(body)
    seed = body.get("seed") or 0
    plans = []
    for i in range(body.get("n") or 1):
        plan = ChoicePlan(i)
        if state.reasoning:
            plan.reasoning = _text.reasoning_pieces(prompt, seed + i)
        if tool is not None:
            function = tool["function"]
            plan.tool_call = {
                "id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}",
                "name": function.get("name", ""),
                "arguments": json.dumps(_text.tool_arguments(function.get("parameters"), prompt, seed + i)),
                "mode": mode,
            }
            plan.finish_reason = "stop" if mode == "named" else "tool_calls"
        elif schema is not None:
            pieces = _text.split_pieces(_text.json_text(schema, prompt, seed + i))
            plan.content = _text.limit(pieces, max_tokens, stops)
        else:
            plan.content = _text.generate(prompt, seed + i, max_tokens, stops)
        if tool is None:
            plan.finish_reason = plan.content.finish_reason
            plan.stop_reason = plan.content.stop_reason
        plans.append(plan)
    return plans


def chat_message(state: FakeVllm, plan: ChoicePlan) -> dict:
    message = {
        "role": "assistant",
        "content": plan.content.text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        state.reasoning_key: "".join(plan.reasoning) if plan.reasoning else None,
    }
    if plan.tool_call:
        call = plan.tool_call
        # vLLM: forced calls come with content "", parsed "auto" calls with content null.
        message["content"] = None if call["mode"] == "auto" else ""
        message["tool_calls"] = [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ]
    return message


def chunk_events(state: FakeVllm, plan: ChoicePlan) -> list[tuple[dict, bool]]:
    """The stream deltas of one choice after the role chunk: (delta, is_content_token)."""
    events: list[tuple[dict, bool]] = [({state.reasoning_key: piece}, True) for piece in plan.reasoning]
    if plan.tool_call:
        call = plan.tool_call
        arg_pieces = _text.split_pieces(call["arguments"])
        events.append((
            {"tool_calls": [{"id": call["id"], "type": "function", "index": 0,
                             "function": {"name": call["name"], "arguments": ""}}]},
            False,
        ))
        events += [({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, True) for p in arg_pieces]
    else:
        events += [({"content": piece}, True) for piece in plan.content.pieces]
        if not plan.content.pieces:
            events.append(({"content": ""}, False))
    return events


# ---------------------------------------------------------------- handlers


def make_app(state: FakeVllm) -> web.Application:
    app = web.Application(middlewares=[not_found_middleware, auth_middleware(state), crash_middleware(state)],
                          client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", lambda r: health(state, r))
    app.router.add_get("/ping", lambda r: health(state, r))
    app.router.add_post("/ping", lambda r: health(state, r))
    app.router.add_get("/version", lambda r: web.json_response({"version": VERSION}))
    app.router.add_get("/metrics", lambda r: metrics(state, r))
    app.router.add_get("/v1/models", lambda r: models(state, r))
    app.router.add_post("/v1/chat/completions", lambda r: inference(state, r, chat_completions))
    app.router.add_post("/v1/completions", lambda r: inference(state, r, completions))
    app.router.add_post("/v1/embeddings", lambda r: inference(state, r, embeddings))
    app.router.add_post("/tokenize", lambda r: inference(state, r, tokenize))
    app.router.add_get("/fake/last_request", lambda r: web.json_response(state.last_request))
    app.router.add_get("/fake/stats", lambda r: fake_stats(state))
    app.router.add_post("/fake/stats/reset", lambda r: fake_stats(state, reset=True))
    return app


async def fake_stats(state: FakeVllm, reset: bool = False) -> web.Response:
    if reset:
        state.peak_inflight, state.finished = state.inflight, 0
        state.group_peak = Counter({g: n for g, n in state.group_inflight.items() if n})
    return web.json_response({"peak_running": state.peak_inflight, "running": state.inflight,
                              "served": state.finished, "peak_by_group": dict(state.group_peak)})


@web.middleware
async def not_found_middleware(request: web.Request, handler):
    """FastAPI answers unknown routes with JSON, not aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return web.json_response({"detail": "Method Not Allowed"}, status=405)


def auth_middleware(state: FakeVllm):
    @web.middleware
    async def check(request: web.Request, handler):
        # vLLM's key covers /v1/* only: /health, /metrics, /tokenize stay open.
        if state.api_key and request.path.startswith("/v1") and request.method != "OPTIONS":
            if request.headers.get("Authorization") != f"Bearer {state.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check


def crash_middleware(state: FakeVllm):
    @web.middleware
    async def crash(request: web.Request, handler):
        if state.crash_after is None or request.path not in INFERENCE_PATHS:
            return await handler(request)
        if state.served >= state.crash_after:
            log(f"FAKE_CRASH_AFTER={state.crash_after}: dying abruptly", "ERROR")
            os._exit(1)
        response = await handler(request)
        state.served += 1
        if state.served >= state.crash_after:
            # Leave time to flush this response, then die without cleanup (the engine child survives).
            log(f"FAKE_CRASH_AFTER={state.crash_after}: dying abruptly", "ERROR")
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)
        return response

    return crash


async def health(state: FakeVllm, request: web.Request) -> web.Response:
    if state.engine_dead():
        return web.Response(status=503)
    return web.Response(status=200)


async def models(state: FakeVllm, request: web.Request) -> web.Response:
    data = []
    for name in state.names:
        data.append({
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "vllm",
            "root": state.model,
            "parent": None,
            "max_model_len": state.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": state.created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        })
    return web.json_response({"object": "list", "data": data})


async def metrics(state: FakeVllm, request: web.Request) -> web.Response:
    labels = f'engine="0",model_name="{state.names[0]}"'
    usage = min(1.0, state.running / max(1, state.args.max_num_seqs))
    cache_name = "vllm:gpu_cache_usage_perc" if env_flag("FAKE_VLLM_OLD_METRICS") else "vllm:kv_cache_usage_perc"
    lines = []

    def gauge(name: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {float(value)}"])

    def counter(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter"])
        for extra, value in samples:
            lines.append(f"{name}_total{{{labels}{extra}}} {float(value)}")
        for extra, _ in samples:
            lines.append(f"{name}_created{{{labels}{extra}}} {float(state.created)}")

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", state.running)
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", state.waiting)
    gauge(cache_name, "KV-cache usage. 1 means 100 percent usage.", usage)
    counter("vllm:prompt_tokens", "Number of prefill tokens processed.", [("", state.prompt_tokens_total)])
    counter("vllm:generation_tokens", "Number of generation tokens processed.", [("", state.generation_tokens_total)])
    counter("vllm:request_success", "Count of successfully processed requests.",
            [(f',finished_reason="{reason}"', count) for reason, count in sorted(state.success.items())])
    lines += state.ttft.render("vllm:time_to_first_token_seconds", labels, "Histogram of time to first token in seconds.")
    lines += state.e2e.render("vllm:e2e_request_latency_seconds", labels, "Histogram of e2e request latency in seconds.")
    lines += state.queue_time.render("vllm:request_queue_time_seconds", labels, "Histogram of time spent in WAITING phase for request.")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type": "text/plain; version=0.0.4"})


async def inference(state: FakeVllm, request: web.Request, handler) -> web.StreamResponse:
    """Common wrapper: engine liveness, JSON parsing, model lookup, 400 mapping."""
    if state.engine_dead():
        # vLLM: EngineDeadError -> 500, then the API server shuts itself down.
        log("Engine core is dead; shutting down the API server", "ERROR", "launcher.py:99")
        state.exit_code = 1
        asyncio.get_running_loop().call_later(0.1, state.shutdown.set)
        return state.error(500, "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                           "InternalServerError")
    state.inflight += 1
    state.peak_inflight = max(state.peak_inflight, state.inflight)
    request_id = request.headers.get("x-request-id", "")
    group = request_id.partition(".")[0] if "." in request_id else None
    if group is not None:
        state.group_inflight[group] += 1
        state.group_peak[group] = max(state.group_peak[group], state.group_inflight[group])
    try:
        body = await read_json(request)
        state.last_request = body
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("model: Input should be a valid string", "model")
        if model is not None and model not in state.names:
            return state.model_not_found(model)
        return await handler(state, request, body)
    except BadRequest as exc:
        return state.bad_request(exc)
    finally:
        state.inflight -= 1
        state.finished += 1
        if group is not None:
            state.group_inflight[group] -= 1


async def chat_completions(state: FakeVllm, request: web.Request, body: dict) -> web.StreamResponse:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("messages: Field required", "messages")
    if not isinstance(messages, list) or any(not isinstance(m, dict) or "role" not in m for m in messages):
        raise BadRequest("messages: Input should be a valid list of messages with a 'role'", "messages")
    check_sampling(body)
    check_stream_options(body)
    prompt = "\n".join(message_text(m.get("content")) for m in messages)
    prompt_tokens = _text.count_tokens(prompt)
    max_tokens = check_context(prompt_tokens, max_tokens_of(body, None), state.max_model_len)
    plans = plan_chat(state, body, prompt, messages, max_tokens)
    fail_midstream = "FAKE_MIDSTREAM_ERROR" in last_user_text(messages)
    started = time.monotonic()
    async with state.slot():
        if body.get("stream"):
            return await stream_chat(state, request, body, plans, prompt_tokens, fail_midstream, started)
        if fail_midstream:
            return state.error(500, "Injected engine failure (FAKE_MIDSTREAM_ERROR)", "InternalServerError")
        for _ in range(max(p.tokens for p in plans)):
            await asyncio.sleep(state.token_delay)
        state.ttft.observe(time.monotonic() - started)
    completion_tokens = sum(p.tokens for p in plans)
    state.record(prompt_tokens, completion_tokens, plans[0].finish_reason, started)
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.names[0],  # vLLM answers with its first served name, not the alias asked
        "choices": [
            {"index": p.index, "message": chat_message(state, p), "logprobs": None,
             "finish_reason": p.finish_reason, "stop_reason": p.stop_reason, "token_ids": None}
            for p in plans
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    })


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


class SseWriter:
    """Writes `data: {json}\\n\\n` events; remembers whether the client went away."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        self.gone = False

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, payload: object) -> bool:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        try:
            await self.response.write(f"data: {data}\n\n".encode())
        except (ClientConnectionResetError, ConnectionResetError):
            self.gone = True
        return not self.gone

    async def finish(self) -> web.StreamResponse:
        if not self.gone:
            try:
                await self.response.write_eof()
            except (ClientConnectionResetError, ConnectionResetError):
                self.gone = True
        return self.response


async def stream_chat(state: FakeVllm, request: web.Request, body: dict, plans: list[ChoicePlan],
                      prompt_tokens: int, fail_midstream: bool, started: float) -> web.StreamResponse:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": state.names[0]}

    def chunk(choices: list[dict]) -> dict:
        data = dict(base, choices=choices)
        if include_usage:
            data["usage"] = None
        return data

    sse = SseWriter(request)
    await sse.start()
    for plan in plans:
        await sse.send(chunk([{"index": plan.index, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}]))
    events = [chunk_events(state, plan) for plan in plans]
    content_sent = 0
    first_token = True
    for step in range(max(len(e) for e in events)):
        await asyncio.sleep(state.token_delay)
        for plan, plan_events in zip(plans, events):
            if step >= len(plan_events):
                continue
            delta, is_token = plan_events[step]
            choice = {"index": plan.index, "delta": delta, "logprobs": None, "finish_reason": None}
            if step == len(plan_events) - 1:  # vLLM puts finish_reason on the last token's chunk
                choice.update(finish_reason=plan.finish_reason, stop_reason=plan.stop_reason)
            if not await sse.send(chunk([choice])):
                state.success["abort"] += 1
                return sse.response
            if first_token:
                state.ttft.observe(time.monotonic() - started)
                first_token = False
            content_sent += is_token
            if fail_midstream and content_sent == 2:
                await sse.send(state.error_body(500, "Injected engine failure (FAKE_MIDSTREAM_ERROR)",
                                                "InternalServerError"))
                await sse.send("[DONE]")
                return await sse.finish()
    completion_tokens = sum(p.tokens for p in plans)
    if include_usage:
        await sse.send(dict(base, choices=[], usage=usage(prompt_tokens, completion_tokens)))
    await sse.send("[DONE]")
    state.record(prompt_tokens, completion_tokens, plans[0].finish_reason, started)
    return await sse.finish()


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("prompt: Field required", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [" ".join(f"t{t}" for t in prompt)]  # token ids: one word per id
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [" ".join(f"t{t}" for t in p) for p in prompt]
    raise BadRequest("prompt: Input should be a string, a list of strings or token ids", "prompt")


async def completions(state: FakeVllm, request: web.Request, body: dict) -> web.StreamResponse:
    prompts = completion_prompts(body)
    check_sampling(body)
    check_stream_options(body)
    stops = parse_stop(body)
    seed = body.get("seed") or 0
    n = body.get("n") or 1
    requested = max_tokens_of(body, 16)  # the legacy endpoint defaults to 16 tokens in vLLM
    choices: list[tuple[int, _text.Generation]] = []
    prompt_tokens = 0
    for p_index, prompt in enumerate(prompts):
        count = _text.count_tokens(prompt)
        prompt_tokens += count
        max_tokens = check_context(count, requested, state.max_model_len)
        for i in range(n):
            choices.append((p_index * n + i, _text.generate(prompt, seed + i, max_tokens, stops)))
    completion_tokens = sum(g.tokens for _, g in choices)
    fail_midstream = any("FAKE_MIDSTREAM_ERROR" in p for p in prompts)
    started = time.monotonic()
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.names[0]}
    async with state.slot():
        if not body.get("stream"):
            if fail_midstream:
                return state.error(500, "Injected engine failure (FAKE_MIDSTREAM_ERROR)", "InternalServerError")
            for _ in range(max(g.tokens for _, g in choices)):
                await asyncio.sleep(state.token_delay)
            state.ttft.observe(time.monotonic() - started)
            state.record(prompt_tokens, completion_tokens, choices[0][1].finish_reason, started)
            return web.json_response(dict(base, choices=[
                {"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason,
                 "stop_reason": g.stop_reason, "token_ids": None, "prompt_logprobs": None,
                 "prompt_token_ids": None}
                for i, g in choices
            ], service_tier=None, system_fingerprint=None, usage=usage(prompt_tokens, completion_tokens),
                kv_transfer_params=None))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        sse = SseWriter(request)
        await sse.start()
        sent = 0
        for step in range(max(max(len(g.pieces) for _, g in choices), 1)):
            await asyncio.sleep(state.token_delay)
            for index, gen in choices:
                pieces = gen.pieces or [""]
                if step >= len(pieces):
                    continue
                last = step == len(pieces) - 1
                choice = {"index": index, "text": pieces[step], "logprobs": None,
                          "finish_reason": gen.finish_reason if last else None,
                          "stop_reason": gen.stop_reason if last else None}
                data = dict(base, choices=[choice])
                if include_usage:
                    data["usage"] = None
                if not await sse.send(data):
                    state.success["abort"] += 1
                    return sse.response
                sent += 1
                if fail_midstream and sent == 2:
                    await sse.send(state.error_body(500, "Injected engine failure (FAKE_MIDSTREAM_ERROR)",
                                                    "InternalServerError"))
                    await sse.send("[DONE]")
                    return await sse.finish()
        if include_usage:
            await sse.send(dict(base, choices=[], usage=usage(prompt_tokens, completion_tokens)))
        await sse.send("[DONE]")
        state.record(prompt_tokens, completion_tokens, choices[0][1].finish_reason, started)
        return await sse.finish()


async def embeddings(state: FakeVllm, request: web.Request, body: dict) -> web.Response:
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        inputs = [" ".join(f"t{t}" for t in raw)]
    elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        inputs = [" ".join(f"t{t}" for t in x) for x in raw]
    else:
        raise BadRequest("input: Input should be a string, a list of strings or token ids", "input")
    if body.get("dimensions") is not None:
        raise BadRequest(f'Model "{state.names[0]}" does not support matryoshka representation, '
                         "changing output dimensions will lead to poor results.", "dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format: Input should be 'float' or 'base64'", "encoding_format")
    prompt_tokens = 0
    data = []
    for index, text in enumerate(inputs):
        count = _text.count_tokens(text)
        check_context(count, None, state.max_model_len)
        prompt_tokens += count
        vector = _text.embedding(text)
        if encoding == "base64":  # little-endian float32, what the OpenAI SDK asks for by default
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": vector})
    started = time.monotonic()
    async with state.slot():
        await asyncio.sleep(state.token_delay)
    state.record(prompt_tokens, 0, "stop", started)
    return web.json_response({
        "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": state.names[0], "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    })


async def tokenize(state: FakeVllm, request: web.Request, body: dict) -> web.Response:
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise BadRequest("messages: Input should be a valid list", "messages")
        text = "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise BadRequest("Either `prompt` or `messages` is required")
    tokens = _text.token_ids(text)
    return web.json_response({"count": len(tokens), "max_model_len": state.max_model_len,
                              "tokens": tokens, "token_strs": None})


# ---------------------------------------------------------------- startup / shutdown


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now (like vLLM, which reserves the port first) but do not listen yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve(args: argparse.Namespace) -> int:
    host = args.host or "0.0.0.0"
    log(f"vLLM API server version {VERSION}", where="api_server.py:1839")
    log(f"args: {vars(args)}", where="utils.py:253")
    if not 0 < args.gpu_memory_utilization <= 1:
        log(f"ValueError: GPU memory utilization must be within (0, 1]. Got {args.gpu_memory_utilization}.", "ERROR")
        return 1
    state = FakeVllm(args)
    try:
        sock = bind_socket(host, args.port)
    except OSError as exc:
        log(f"OSError: [Errno {exc.errno}] {exc.strerror}", "ERROR")
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.shutdown.set)
    state.start_engine()
    log(f"Loading model {state.model} ...", where="gpu_model_runner.py:2007")
    stop_wait = asyncio.create_task(state.shutdown.wait())
    await asyncio.wait([stop_wait], timeout=env_float("FAKE_LOAD_SECONDS", 1.0))
    if state.shutdown.is_set():
        state.stop_engine()
        return 0
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s:     %(message)s")
    runner = web.AppRunner(make_app(state), access_log_format='%a - "%r" %s', shutdown_timeout=1.0)
    await runner.setup()
    log(f"Starting vLLM API server 0 on http://{host}:{args.port}", where="launcher.py:34")
    await web.SockSite(runner, sock, backlog=1024).start()
    print("INFO:     Application startup complete.", file=sys.stderr, flush=True)
    await stop_wait
    print("INFO:     Shutting down", file=sys.stderr, flush=True)
    await runner.cleanup()
    state.stop_engine()
    print("INFO:     Application shutdown complete.", file=sys.stderr, flush=True)
    return state.exit_code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
