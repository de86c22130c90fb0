#!/usr/bin/env python3
"""Fake `ollama` for tests (follows shared/reference/runtimes.md, "Ollama").

    OLLAMA_HOST=127.0.0.1:PORT python tests/fakes/fake_ollama.py serve
    OLLAMA_HOST=127.0.0.1:PORT python tests/fakes/fake_ollama.py pull NAME
    python tests/fakes/fake_ollama.py --version

Quirks reproduced on purpose ("a fake friendlier than the real runtime is a defect"):
- only the native API: there is NO /v1/* here.  Real Ollama has an OpenAI layer with gaps
  (no tool_choice/n, num_ctx and keep_alive unsettable, ...); the gateway must translate to
  /api/chat, so a gateway calling /v1 gets gin's plain-text "404 page not found" from this fake;
- `stream` defaults to TRUE; streams are NDJSON (application/x-ndjson), the last line has
  done:true, done_reason and the durations in nanoseconds;
- errors are {"error": "msg"}; an error after streaming started is an {"error": ...} LINE while
  the HTTP status stays 200 (trigger: "FAKE_MIDSTREAM_ERROR" in the last user message);
- a model must be pulled first: 404 `model "x" not found, try pulling it first`; a name
  without a tag means ":latest"; /api/show says `model 'x' not found`;
- without options.num_ctx the context is OLLAMA_CONTEXT_LENGTH (default 4096) and longer prompts
  are SILENTLY truncated (oldest messages dropped, prompt_eval_count capped);
- tool-call `arguments` is a JSON OBJECT (not a string); tool calls carry no id; there is no
  tool_choice: a call happens when tools are given and the last user message says "call the tool";
- message content must be a string: OpenAI-style content parts are a Go unmarshal 400;
  images must be plain base64 (a data: URL is "illegal base64 data");
- option type errors (e.g. "stop": "x") are 500s, like Ollama's options parser;
- embedding models cannot chat (400 `"x" does not support chat`); think:true on a model without
  the thinking capability is a 400; thinking models think by default;
- OLLAMA_NUM_PARALLEL requests run per model, up to OLLAMA_MAX_QUEUE wait, past that 503;
- loading a model spawns a runner child process (like `ollama runner`) that survives a
  SIGKILL of the server (kill the process group); keep_alive expiry / keep_alive 0 unloads it.

Environment: OLLAMA_HOST, OLLAMA_MODELS, OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE, OLLAMA_KEEP_ALIVE,
OLLAMA_CONTEXT_LENGTH, FAKE_OLLAMA_REGISTRY, FAKE_OLLAMA_INSTALLED, FAKE_LOAD_SECONDS (1.0, before
binding), FAKE_MODEL_LOAD_SECONDS (0.2), FAKE_TOKEN_DELAY (0.005), FAKE_PULL_SECONDS (0.3),
FAKE_CRASH_AFTER, FAKE_OUTPUT_WORDS.
Test-only endpoint (NOT part of Ollama): GET /fake/last_request returns the last body received
on /api/chat, /api/generate, /api/embed or /api/embeddings, exactly as sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from aiohttp import ClientConnectionResetError, web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find _text when imported too
import _text  # noqa: E402

VERSION = "0.12.0"
DEFAULT_HOST = "127.0.0.1:11434"
DEFAULT_REGISTRY = "llama3.2:1b,qwen2.5:0.5b,nomic-embed-text"
INFERENCE_PATHS = {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}
FOREVER_NS = 2**63 - 1  # Go's math.MaxInt64 duration: keep_alive < 0 means "never unload"
MIDSTREAM_ERROR = "an error was encountered while running the model: unexpected EOF"

# The runner child (like `ollama runner --model ... --port ...`): idles until killed and does
# not notice its parent's death, so a SIGKILL of the server leaves it orphaned.
RUNNER_CODE = "import time\nwhile True: time.sleep(3600)\n"

INT_OPTIONS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
               "num_gpu", "main_gpu", "num_thread"}
FLOAT_OPTIONS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                 "frequency_penalty"}
BOOL_OPTIONS = {"numa", "low_vram", "vocab_only", "use_mmap", "use_mlock", "penalize_newline"}
LIST_OPTIONS = {"stop"}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def log(message: str, level: str = "INFO", source: str = "routes.go:1") -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f'time={stamp} level={level} source={source} msg="{message}"', file=sys.stderr, flush=True)


def go_time(ns: int | None = None) -> str:
    """Go's time.Time JSON form (RFC 3339 with nanoseconds, UTC)."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    digits = f"{fraction:09d}".rstrip("0")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (f".{digits}" if digits else "") + "Z"


def parse_host(value: str | None) -> tuple[str, int]:
    """OLLAMA_HOST forms: 127.0.0.1:11434, 0.0.0.0, :11434, http://host:port."""
    value = (value or "").strip() or DEFAULT_HOST
    if "://" in value:
        value = value.split("://", 1)[1]
    value = value.split("/", 1)[0]
    host, port = value, "11434"
    if value.startswith("["):  # [::1]:11434
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or port
    elif value.count(":") == 1:
        host, port = value.split(":")
    return host or "127.0.0.1", int(port)


def normalize(name: str) -> str:
    """`llama3.2` -> `llama3.2:latest` (a tag follows the last path segment)."""
    name = name.strip()
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


class OllamaError(Exception):
    """An {"error": message} answer with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---------------------------------------------------------------- model catalogue


KNOWN_MODELS = {
    # name prefix: family, parameter size, quantization, bytes, trained context length
    "llama3.2": ("llama", "1.2B", "Q8_0", 1321098329, 131072),
    "qwen2.5": ("qwen2", "494.03M", "Q4_K_M", 397821319, 32768),
    "qwen3": ("qwen3", "751.63M", "Q4_K_M", 522653767, 40960),
    "deepseek-r1": ("qwen2", "1.8B", "Q4_K_M", 1117322768, 131072),
    "nomic-embed-text": ("nomic-bert", "137M", "F16", 274302450, 2048),
}
THINKING_PREFIXES = ("qwen3", "deepseek-r1", "gpt-oss")


def model_card(name: str) -> dict:
    base = name.split(":")[0].rsplit("/", 1)[-1]
    known = next((v for k, v in KNOWN_MODELS.items() if base.startswith(k)), None)
    family, params, quant, size, ctx = known or (re.sub(r"[^a-z]", "", base) or "llama", "1B", "Q4_K_M",
                                                  700_000_000 + _digest_int(name) % 100_000_000, 8192)
    if "embed" in base:
        capabilities = ["embedding"]
    else:
        capabilities = ["completion", "tools"] + (["thinking"] if base.startswith(THINKING_PREFIXES) else [])
    return {
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "size": size,
        "context_length": ctx,
        "capabilities": capabilities,
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                    "parameter_size": params, "quantization_level": quant},
    }


def _digest_int(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)


# ---------------------------------------------------------------- request validation (Go-like)


def json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def unmarshal_error(value: object, field: str, go_type: str) -> OllamaError:
    """encoding/json's message, e.g. for OpenAI content parts sent to the native API."""
    return OllamaError(400, f"json: cannot unmarshal {json_kind(value)} into Go struct field {field} of type {go_type}")


def expect(value: object, kind: str, field: str, go_type: str) -> None:
    if value is not None and json_kind(value) != kind:
        raise unmarshal_error(value, field, go_type)


def parse_body(raw: bytes) -> dict:
    if not raw.strip():
        raise OllamaError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        text = raw.decode(errors="replace")
        position = getattr(exc, "pos", len(text))
        if position >= len(text.rstrip()):
            raise OllamaError(400, "unexpected EOF") from None
        raise OllamaError(400, f"invalid character '{text[position]}' looking for beginning of value") from None
    if not isinstance(body, dict):
        raise unmarshal_error(body, "", "api.Request")
    return body


def check_images(images: object, field: str) -> None:
    expect(images, "array", field, "[]api.ImageData")
    for image in images or []:
        expect(image, "string", field, "api.ImageData")
        if image is None:
            continue
        bad = next((i for i, ch in enumerate(image) if not (ch.isalnum() or ch in "+/=")), None)
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise OllamaError(400, f"illegal base64 data at input byte {bad if bad is not None else len(image)}") from None


def check_messages(messages: object) -> list[dict]:
    expect(messages, "array", "ChatRequest.messages", "[]api.Message")
    for message in messages or []:
        expect(message, "object", "ChatRequest.messages", "api.Message")
        expect(message.get("role"), "string", "Message.messages.role", "string")
        expect(message.get("content"), "string", "Message.messages.content", "string")
        expect(message.get("thinking"), "string", "Message.messages.thinking", "string")
        expect(message.get("tool_name"), "string", "Message.messages.tool_name", "string")
        check_images(message.get("images"), "Message.messages.images")
        expect(message.get("tool_calls"), "array", "Message.messages.tool_calls", "[]api.ToolCall")
        for call in message.get("tool_calls") or []:
            expect(call, "object", "Message.messages.tool_calls", "api.ToolCall")
            function = call.get("function")
            expect(function, "object", "ToolCall.messages.tool_calls.function", "api.ToolCallFunction")
            expect((function or {}).get("arguments"), "object",
                   "ToolCallFunction.messages.tool_calls.function.arguments", "api.ToolCallFunctionArguments")
    return messages or []


def check_common(body: dict, request_type: str) -> None:
    expect(body.get("model"), "string", f"{request_type}.model", "string")
    expect(body.get("stream"), "bool", f"{request_type}.stream", "bool")
    expect(body.get("options"), "object", f"{request_type}.options", "map[string]interface {}")
    expect(body.get("tools"), "array", f"{request_type}.tools", "api.Tools")
    think = body.get("think")
    if think is not None and not isinstance(think, (bool, str)):
        raise OllamaError(400, "think must be a boolean or string")


def check_options(options: dict | None) -> dict:
    """api.Options.FromMap: a wrong type is an error (answered as 500 by Ollama)."""
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in INT_OPTIONS and json_kind(value) != "number":
            raise OllamaError(500, f'option "{key}" must be of type integer')
        if key in FLOAT_OPTIONS and json_kind(value) != "number":
            raise OllamaError(500, f'option "{key}" must be of type float32')
        if key in BOOL_OPTIONS and not isinstance(value, bool):
            raise OllamaError(500, f'option "{key}" must be of type boolean')
        if key in LIST_OPTIONS:
            if not isinstance(value, list):
                raise OllamaError(500, f'option "{key}" must be of type array')
            if not all(isinstance(v, str) for v in value):
                raise OllamaError(500, f'option "{key}" must be of an array of strings')
    return options or {}


DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_duration_ns(value: object) -> int:
    """api.Duration: a number is seconds, a string is a Go duration; negative means forever."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OllamaError(400, f"Unsupported type: '{json_kind(value)}'")
    if isinstance(value, (int, float)):
        return FOREVER_NS if value < 0 else int(value) * 1_000_000_000
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return 0
    if not body or DURATION_PART.sub("", body) != "":
        if re.fullmatch(r"\d+\.?\d*", body):
            raise OllamaError(400, f'time: missing unit in duration "{value}"')
        raise OllamaError(400, f'time: invalid duration "{value}"')
    total = sum(float(num) * DURATION_UNITS[unit] for num, unit in DURATION_PART.findall(body))
    return FOREVER_NS if sign < 0 else int(total)


def check_format(fmt: object) -> object:
    """format: "" / null / "json" / a JSON schema object; anything else fails in the runner (500)."""
    if fmt in (None, "", "null"):
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raise OllamaError(500, f'invalid format: {json.dumps(json.dumps(fmt))}; expected "json" or a valid JSON Schema object')


# ---------------------------------------------------------------- server state


class Loaded:
    """A model held in memory by a runner process."""

    def __init__(self, runner: subprocess.Popen, context_length: int, num_parallel: int):
        self.runner = runner
        self.context_length = context_length
        self.slots = asyncio.Semaphore(num_parallel)
        self.active = 0
        self.expires_ns = time.time_ns()


class FakeOllama:
    def __init__(self):
        self.own_models_dir = not os.environ.get("OLLAMA_MODELS")  # a temp dir, removed at clean exit
        self.models_dir = os.environ.get("OLLAMA_MODELS") or tempfile.mkdtemp(prefix="fake-ollama-models-")
        os.makedirs(self.models_dir, exist_ok=True)
        self.manifest_path = os.path.join(self.models_dir, "fake_ollama_installed.json")
        registry = os.environ.get("FAKE_OLLAMA_REGISTRY", DEFAULT_REGISTRY)
        self.registry = {normalize(n) for n in registry.split(",") if n.strip()}
        self.installed: dict[str, int] = self.read_installed()  # name -> modified time (ns)
        for name in os.environ.get("FAKE_OLLAMA_INSTALLED", "").split(","):
            if name.strip() and normalize(name) not in self.installed:
                self.installed[normalize(name)] = time.time_ns()
        self.write_installed()
        self.num_parallel = int(os.environ.get("OLLAMA_NUM_PARALLEL") or 1)
        self.max_queue = int(os.environ.get("OLLAMA_MAX_QUEUE") or 512)
        self.default_ctx = int(os.environ.get("OLLAMA_CONTEXT_LENGTH") or 4096)
        self.default_keep_alive_ns = parse_duration_ns(self._env_keep_alive())
        self.token_delay = env_float("FAKE_TOKEN_DELAY", 0.005)
        self.model_load_seconds = env_float("FAKE_MODEL_LOAD_SECONDS", 0.2)
        self.pull_seconds = env_float("FAKE_PULL_SECONDS", 0.3)
        crash_after = os.environ.get("FAKE_CRASH_AFTER")
        self.crash_after = int(crash_after) if crash_after not in (None, "") else None
        self.served = 0
        self.loaded: dict[str, Loaded] = {}
        self.load_locks: dict[str, asyncio.Lock] = {}
        self.waiting = 0
        self.last_request: object = None
        self.shutdown = asyncio.Event()

    @staticmethod
    def _env_keep_alive() -> object:
        value = os.environ.get("OLLAMA_KEEP_ALIVE") or "5m"
        return int(value) if re.fullmatch(r"-?\d+", value) else value  # a bare number means seconds

    # -- installed models (persisted in OLLAMA_MODELS)

    def read_installed(self) -> dict[str, int]:
        try:
            with open(self.manifest_path) as f:
                return {name: int(ts) for name, ts in json.load(f).items()}
        except (OSError, ValueError):
            return {}

    def write_installed(self) -> None:
        tmp = self.manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.installed, f, indent=1)
        os.replace(tmp, self.manifest_path)

    def require_installed(self, requested: str) -> str:
        name = normalize(requested)
        if not requested or name not in self.installed:
            raise OllamaError(404, f'model "{requested}" not found, try pulling it first')
        return name

    # -- loading, slots, unloading

    async def acquire(self, name: str, num_ctx: int) -> tuple[Loaded, float]:
        """Load the model if needed and take a slot; returns (model, seconds spent loading)."""
        if self.waiting >= self.max_queue:
            raise OllamaError(503, "server busy, please try again.  maximum pending requests exceeded")
        self.waiting += 1
        try:
            load_seconds = 0.0
            lock = self.load_locks.setdefault(name, asyncio.Lock())
            async with lock:
                current = self.loaded.get(name)
                if current is not None and current.context_length != num_ctx and current.active == 0:
                    self.unload(name)  # a different num_ctx reloads the model, as in Ollama
                    current = None
                if current is None:
                    started = time.monotonic()
                    current = self.load(name, num_ctx)
                    await asyncio.sleep(self.model_load_seconds)
                    load_seconds = time.monotonic() - started
                current.active += 1
            try:
                await current.slots.acquire()
            except BaseException:
                current.active -= 1
                raise
        finally:
            self.waiting -= 1
        return current, load_seconds

    def release(self, name: str, model: Loaded, keep_alive_ns: int) -> None:
        model.slots.release()
        model.active -= 1
        model.expires_ns = time.time_ns() + keep_alive_ns if keep_alive_ns < FOREVER_NS else FOREVER_NS
        if keep_alive_ns == 0 and model.active == 0:
            self.unload(name)

    def load(self, name: str, num_ctx: int) -> Loaded:
        card = model_card(name)
        blob = os.path.join(self.models_dir, "blobs", f"sha256-{card['digest']}")
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER_CODE, "runner", "--model", blob, "--port", str(40000 + _digest_int(name) % 20000)],
            stdin=subprocess.DEVNULL,
        )
        log(f"starting llama server (runner pid {runner.pid}) for {name} num_ctx={num_ctx}", source="server.go:399")
        model = Loaded(runner, num_ctx, self.num_parallel)
        model.expires_ns = time.time_ns() + min(self.default_keep_alive_ns, FOREVER_NS - time.time_ns())
        self.loaded[name] = model
        return model

    def unload(self, name: str) -> None:
        model = self.loaded.pop(name, None)
        if model is None:
            return
        log(f"unloading model {name}", source="sched.go:553")
        if model.runner.poll() is None:
            model.runner.terminate()
            try:
                model.runner.wait(5)
            except subprocess.TimeoutExpired:
                model.runner.kill()

    def unload_all(self) -> None:
        for name in list(self.loaded):
            self.unload(name)

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time_ns()
            for name, model in list(self.loaded.items()):
                if model.active == 0 and model.expires_ns <= now:
                    self.unload(name)

    def context_for(self, name: str, options: dict) -> int:
        requested = int(options.get("num_ctx") or self.default_ctx)
        return max(1, min(requested, model_card(name)["context_length"]))

    def keep_alive_for(self, body: dict) -> int:
        if body.get("keep_alive") is None:
            return self.default_keep_alive_ns
        return parse_duration_ns(body["keep_alive"])


# ---------------------------------------------------------------- prompt handling


def fit_messages(messages: list[dict], num_ctx: int) -> str:
    """The prompt the model actually sees.  Ollama drops the oldest messages that do not fit in
    num_ctx (system messages and the last message stay), then the runner cuts the front of what
    is still too long.  Nothing tells the client, except a smaller prompt_eval_count."""
    def tokens(m: dict) -> int:
        return _text.count_tokens(m.get("content") or "")

    system = [m for m in messages if m.get("role") == "system"]
    others = [m for m in messages if m.get("role") != "system"]
    total = sum(tokens(m) for m in system)
    kept: list[dict] = []
    for message in reversed(others):
        if kept and total + tokens(message) > num_ctx:
            break
        kept.insert(0, message)
        total += tokens(message)
    text = "\n".join(m.get("content") or "" for m in system + kept)
    return fit_text(text, num_ctx)


def fit_text(text: str, num_ctx: int) -> str:
    words = text.split()
    return " ".join(words[-num_ctx:]) if len(words) > num_ctx else text


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content") or ""
    return ""


class Reply:
    """What the fake model answers: thinking pieces, content pieces or a tool call."""

    def __init__(self):
        self.thinking: list[str] = []
        self.content = _text.Generation()
        self.tool_calls: list[dict] = []

    @property
    def eval_count(self) -> int:
        args = sum(_text.count_tokens(json.dumps(c["function"]["arguments"])) for c in self.tool_calls)
        return len(self.thinking) + self.content.tokens + args


def plan_reply(prompt: str, options: dict, fmt: object, think: bool, tools: list, wants_tool: bool) -> Reply:
    seed = int(options.get("seed") or 0)
    num_predict = options.get("num_predict")
    max_tokens = int(num_predict) if isinstance(num_predict, (int, float)) and num_predict > 0 else None
    stops = options.get("stop") or []
    reply = Reply()
    if think:
        reply.thinking = _text.reasoning_pieces(prompt, seed)
    if tools and wants_tool:
        function = (tools[0] or {}).get("function") or {}
        arguments = _text.tool_arguments(function.get("parameters"), prompt, seed)
        reply.tool_calls = [{"function": {"name": function.get("name", ""), "arguments": arguments}}]
    elif fmt is not None:
        schema = fmt if isinstance(fmt, dict) else {}
        reply.content = _text.limit(_text.split_pieces(_text.json_text(schema, prompt, seed)), max_tokens, stops)
    else:
        reply.content = _text.generate(prompt, seed, max_tokens, stops)
    return reply


# ---------------------------------------------------------------- app and middlewares


def make_app(state: FakeOllama) -> web.Application:
    app = web.Application(middlewares=[gin_middleware(state)], client_max_size=256 * 1024 * 1024)
    app.router.add_get("/", lambda r: web.Response(text="Ollama is running"))
    app.router.add_get("/api/version", lambda r: web.json_response({"version": VERSION}))
    app.router.add_get("/api/tags", lambda r: tags(state, r))
    app.router.add_get("/api/ps", lambda r: ps(state, r))
    app.router.add_post("/api/show", lambda r: show(state, r))
    app.router.add_post("/api/pull", lambda r: pull(state, r))
    app.router.add_delete("/api/delete", lambda r: delete(state, r))
    app.router.add_post("/api/chat", lambda r: chat(state, r))
    app.router.add_post("/api/generate", lambda r: generate(state, r))
    app.router.add_post("/api/embed", lambda r: embed(state, r))
    app.router.add_post("/api/embeddings", lambda r: embeddings_legacy(state, r))
    # NOTE: no /v1/* routes on purpose (see the module docstring).
    app.router.add_get("/fake/last_request", lambda r: last_request(state, r))
    return app


def gin_middleware(state: FakeOllama):
    @web.middleware
    async def middleware(request: web.Request, handler):
        started = time.monotonic()
        crash_counted = state.crash_after is not None and request.path in INFERENCE_PATHS
        if crash_counted and state.served >= state.crash_after:
            log(f"FAKE_CRASH_AFTER={state.crash_after}: dying abruptly", "ERROR")
            os._exit(1)
        try:
            response = await handler(request)
        except web.HTTPNotFound:  # gin's plain-text 404/405 bodies
            response = web.Response(status=404, text="404 page not found")
        except web.HTTPMethodNotAllowed:
            response = web.Response(status=405, text="405 method not allowed")
        except OllamaError as exc:
            response = error_response(exc.status, str(exc))
        elapsed = (time.monotonic() - started) * 1000
        print(f'[GIN] {time.strftime("%Y/%m/%d - %H:%M:%S")} | {response.status} | {elapsed:10.3f}ms | '
              f'{request.remote} | {request.method:<7} "{request.path}"', file=sys.stderr, flush=True)
        if crash_counted:
            state.served += 1
            if state.served >= state.crash_after:
                log(f"FAKE_CRASH_AFTER={state.crash_after}: dying abruptly", "ERROR")
                asyncio.get_running_loop().call_later(0.05, os._exit, 1)
        return response

    return middleware


async def last_request(state: FakeOllama, request: web.Request) -> web.Response:
    if state.last_request is None:
        return error_response(404, "no request received yet")
    return web.json_response(state.last_request)


async def read_body(state: FakeOllama, request: web.Request, record: bool = False) -> dict:
    raw = await request.read()
    if record:
        try:
            state.last_request = json.loads(raw)
        except ValueError:
            state.last_request = {"_unparsable_body": raw.decode(errors="replace")}
    return parse_body(raw)


# ---------------------------------------------------------------- model management endpoints


def model_entry(state: FakeOllama, name: str) -> dict:
    card = model_card(name)
    return {"name": name, "model": name, "modified_at": go_time(state.installed[name]), "size": card["size"],
            "digest": card["digest"], "details": card["details"]}


async def tags(state: FakeOllama, request: web.Request) -> web.Response:
    names = sorted(state.installed, key=lambda n: state.installed[n], reverse=True)  # newest first
    return web.json_response({"models": [model_entry(state, n) for n in names]})


async def ps(state: FakeOllama, request: web.Request) -> web.Response:
    models = []
    for name, model in state.loaded.items():
        card = model_card(name)
        models.append({"name": name, "model": name, "size": card["size"], "digest": card["digest"],
                       "details": card["details"], "expires_at": go_time(model.expires_ns),
                       "size_vram": 0, "context_length": model.context_length})
    models.sort(key=lambda m: m["expires_at"], reverse=True)
    return web.json_response({"models": models})


async def show(state: FakeOllama, request: web.Request) -> web.Response:
    body = await read_body(state, request)
    requested = body.get("model") or body.get("name")
    if not requested:
        raise OllamaError(400, "model is required")
    name = normalize(requested)
    if name not in state.installed:
        raise OllamaError(404, f"model '{requested}' not found")
    card = model_card(name)
    family = card["details"]["family"]
    return web.json_response({
        "license": "FAKE LICENSE",
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\nTEMPLATE "{{{{ .Prompt }}}}"\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": card["details"],
        "model_info": {"general.architecture": family, "general.parameter_count": card["size"] // 2,
                       f"{family}.context_length": card["context_length"], f"{family}.embedding_length": 8},
        "capabilities": card["capabilities"],
        "modified_at": go_time(state.installed[name]),
    })


async def delete(state: FakeOllama, request: web.Request) -> web.Response:
    body = await read_body(state, request)
    requested = body.get("model") or body.get("name") or ""
    name = normalize(requested)
    if name not in state.installed:
        raise OllamaError(404, f"model '{requested}' not found")
    del state.installed[name]
    state.write_installed()
    return web.Response(status=200)


async def pull(state: FakeOllama, request: web.Request) -> web.StreamResponse:
    body = await read_body(state, request)
    requested = body.get("model") or body.get("name") or ""
    if not requested.strip():
        raise OllamaError(400, "invalid model name")
    name = normalize(requested)
    card = model_card(name)
    layers = [(card["digest"], card["size"] - 1586),
              (hashlib.sha256((name + "template").encode()).hexdigest(), 1429),
              (hashlib.sha256((name + "params").encode()).hexdigest(), 157)]
    events: list[dict] = [{"status": "pulling manifest"}]
    if name in state.registry:
        for digest, total in layers:
            status = f"pulling {digest[:12]}"
            events += [{"status": status, "digest": f"sha256:{digest}", "total": total},
                       {"status": status, "digest": f"sha256:{digest}", "total": total, "completed": total // 2},
                       {"status": status, "digest": f"sha256:{digest}", "total": total, "completed": total}]
        events += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    else:
        events.append({"error": "pull model manifest: file does not exist"})
    delay = state.pull_seconds / len(events)
    if body.get("stream") is False:  # one answer at the end: the last status, or the error as a 500
        await asyncio.sleep(state.pull_seconds)
        if "error" in events[-1]:
            return error_response(500, events[-1]["error"])
        finish_pull(state, name)
        return web.json_response(events[-1])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for event in events:
        await asyncio.sleep(delay)
        if event.get("status") == "success":
            finish_pull(state, name)
        try:
            await response.write((json.dumps(event) + "\n").encode())
        except (ClientConnectionResetError, ConnectionResetError):
            return response
    await response.write_eof()
    return response


def finish_pull(state: FakeOllama, name: str) -> None:
    state.installed[name] = time.time_ns()
    state.write_installed()


# ---------------------------------------------------------------- inference endpoints


class NdjsonWriter:
    """One JSON object per line; remembers whether the client went away."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        self.gone = False

    async def send(self, obj: dict) -> bool:
        try:
            if not self.response.prepared:
                await self.response.prepare(self.request)
            await self.response.write((json.dumps(obj) + "\n").encode())
        except (ClientConnectionResetError, ConnectionResetError):
            self.gone = True
        return not self.gone

    async def finish(self) -> web.StreamResponse:
        if not self.gone:
            try:
                await self.response.write_eof()
            except (ClientConnectionResetError, ConnectionResetError):
                pass
        return self.response


def done_metrics(started_ns: int, load_seconds: float, prompt_eval_count: int, eval_count: int,
                 eval_ns: int) -> dict:
    metrics = {
        "total_duration": time.monotonic_ns() - started_ns,
        "load_duration": int(load_seconds * 1e9) or 1_000_000,
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": prompt_eval_count * 100_000,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }
    return {k: v for k, v in metrics.items() if v}  # Go's omitempty drops zeros


def think_enabled(name: str, requested: str, think: object) -> bool:
    """Thinking models think unless told not to; others refuse think:true."""
    capable = "thinking" in model_card(name)["capabilities"]
    if not capable:
        if think not in (None, False):
            raise OllamaError(400, f'"{requested}" does not support thinking')
        return False
    return think is not False


async def chat(state: FakeOllama, request: web.Request) -> web.StreamResponse:
    started_ns = time.monotonic_ns()
    body = await read_body(state, request, record=True)
    check_common(body, "ChatRequest")
    messages = check_messages(body.get("messages"))
    requested = body.get("model") or ""
    if not requested:
        raise OllamaError(400, "model is required")
    name = state.require_installed(requested)
    keep_alive = state.keep_alive_for(body)
    if not messages and keep_alive == 0:
        state.unload(name)
        return web.json_response({"model": requested, "created_at": go_time(),
                                  "message": {"role": "assistant", "content": ""}, "done_reason": "unload", "done": True})
    if "completion" not in model_card(name)["capabilities"]:
        raise OllamaError(400, f'"{requested}" does not support chat')
    think = think_enabled(name, requested, body.get("think"))
    options = check_options(body.get("options"))
    fmt = check_format(body.get("format"))
    num_ctx = state.context_for(name, options)
    model, load_seconds = await state.acquire(name, num_ctx)
    try:
        if not messages:
            return web.json_response({"model": requested, "created_at": go_time(),
                                      "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": True})
        prompt = fit_messages(messages, num_ctx)
        wants_tool = "call the tool" in last_user_text(messages).lower()
        reply = plan_reply(prompt, options, fmt, think, body.get("tools") or [], wants_tool)
        fail = "FAKE_MIDSTREAM_ERROR" in last_user_text(messages)
        return await answer(state, request, body, requested, reply, prompt, load_seconds, started_ns, fail,
                            field="message")
    finally:
        state.release(name, model, keep_alive)


async def generate(state: FakeOllama, request: web.Request) -> web.StreamResponse:
    started_ns = time.monotonic_ns()
    body = await read_body(state, request, record=True)
    check_common(body, "GenerateRequest")
    for key in ("prompt", "system", "template", "suffix"):
        expect(body.get(key), "string", f"GenerateRequest.{key}", "string")
    check_images(body.get("images"), "GenerateRequest.images")
    requested = body.get("model") or ""
    name = state.require_installed(requested)
    keep_alive = state.keep_alive_for(body)
    prompt_text = body.get("prompt") or ""
    if not prompt_text and keep_alive == 0:
        state.unload(name)
        return web.json_response({"model": requested, "created_at": go_time(), "response": "", "done": True,
                                  "done_reason": "unload"})
    if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
        raise OllamaError(400, "raw mode does not support template, system, or context")
    if "completion" not in model_card(name)["capabilities"]:
        raise OllamaError(400, f'"{requested}" does not support generate')
    think = think_enabled(name, requested, body.get("think"))
    options = check_options(body.get("options"))
    fmt = check_format(body.get("format"))
    num_ctx = state.context_for(name, options)
    model, load_seconds = await state.acquire(name, num_ctx)
    try:
        if not prompt_text:
            return web.json_response({"model": requested, "created_at": go_time(), "response": "", "done": True,
                                      "done_reason": "load"})
        prompt = fit_text("\n".join(filter(None, [body.get("system"), prompt_text])), num_ctx)
        reply = plan_reply(prompt, options, fmt, think, [], False)
        fail = "FAKE_MIDSTREAM_ERROR" in prompt_text
        return await answer(state, request, body, requested, reply, prompt, load_seconds, started_ns, fail,
                            field="response")
    finally:
        state.release(name, model, keep_alive)


def piece_object(requested: str, field: str, content: str = "", thinking: str | None = None,
                 tool_calls: list | None = None) -> dict:
    """One streamed object of /api/chat (field "message") or /api/generate (field "response")."""
    obj: dict = {"model": requested, "created_at": go_time()}
    if field == "message":
        message: dict = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        obj["message"] = message
    else:
        obj["response"] = content
        if thinking:
            obj["thinking"] = thinking
    obj["done"] = False
    return obj


async def answer(state: FakeOllama, request: web.Request, body: dict, requested: str, reply: Reply, prompt: str,
                 load_seconds: float, started_ns: int, fail: bool, field: str) -> web.StreamResponse:
    """Send the reply as NDJSON (default) or one JSON object (stream: false)."""
    prompt_eval_count = _text.count_tokens(prompt)
    events = [piece_object(requested, field, thinking=p) for p in reply.thinking]
    if reply.tool_calls:
        events.append(piece_object(requested, field, tool_calls=reply.tool_calls))
    events += [piece_object(requested, field, content=p) for p in reply.content.pieces]
    stream = body.get("stream") is not False
    if not stream and fail:
        raise OllamaError(500, MIDSTREAM_ERROR)
    writer = NdjsonWriter(request) if stream else None
    eval_started = time.monotonic_ns()
    for index, event in enumerate(events):
        await asyncio.sleep(state.token_delay)
        if writer is not None:
            if not await writer.send(event):
                return writer.response
            if fail and index == 1:  # after 2 chunks: an error LINE, HTTP status already 200
                await writer.send({"error": MIDSTREAM_ERROR})
                return await writer.finish()
    final = piece_object(requested, field)
    final["done_reason"] = reply.content.finish_reason
    final["done"] = True
    if field == "response" and not body.get("raw"):
        final["context"] = _text.token_ids(prompt + reply.content.text)
    final.update(done_metrics(started_ns, load_seconds, prompt_eval_count, reply.eval_count,
                              time.monotonic_ns() - eval_started))
    if writer is not None:
        await writer.send(final)
        return await writer.finish()
    # Non-streamed: the same final object carrying the whole text.
    if field == "message":
        final["message"]["content"] = reply.content.text
        if reply.thinking:
            final["message"]["thinking"] = "".join(reply.thinking)
        if reply.tool_calls:
            final["message"]["tool_calls"] = reply.tool_calls
    else:
        final["response"] = reply.content.text
        if reply.thinking:
            final["thinking"] = "".join(reply.thinking)
    return web.json_response(final)


async def embed(state: FakeOllama, request: web.Request) -> web.Response:
    started_ns = time.monotonic_ns()
    body = await read_body(state, request, record=True)
    expect(body.get("model"), "string", "EmbedRequest.model", "string")
    expect(body.get("truncate"), "bool", "EmbedRequest.truncate", "bool")
    expect(body.get("dimensions"), "number", "EmbedRequest.dimensions", "int")
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = raw
    elif raw is None:
        inputs = []
    else:
        raise OllamaError(400, "invalid input type")
    requested = body.get("model") or ""
    name = state.require_installed(requested)
    options = check_options(body.get("options"))
    keep_alive = state.keep_alive_for(body)
    num_ctx = min(state.context_for(name, options), model_card(name)["context_length"])
    model, load_seconds = await state.acquire(name, num_ctx)
    try:
        if not inputs:
            return web.json_response({"model": requested, "embeddings": []})
        vectors, tokens = [], 0
        for text in inputs:
            count = _text.count_tokens(text)
            if count > num_ctx:
                if body.get("truncate") is False:
                    raise OllamaError(400, "the input length exceeds the context length")
                text = " ".join(text.split()[:num_ctx])  # silently truncated by default
                count = num_ctx
            tokens += count
            vectors.append(resize(_text.embedding(text), body.get("dimensions")))
        await asyncio.sleep(state.token_delay)
        return web.json_response({"model": requested, "embeddings": vectors,
                                  "total_duration": time.monotonic_ns() - started_ns,
                                  "load_duration": int(load_seconds * 1e9) or 1_000_000,
                                  "prompt_eval_count": tokens})
    finally:
        state.release(name, model, keep_alive)


def resize(vector: list[float], dimensions: object) -> list[float]:
    """`dimensions` keeps the first N values and re-normalises, as Ollama does."""
    if isinstance(dimensions, int) and 0 < dimensions < len(vector):
        vector = vector[:dimensions]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        vector = [v / norm for v in vector]
    return vector


async def embeddings_legacy(state: FakeOllama, request: web.Request) -> web.Response:
    body = await read_body(state, request, record=True)
    expect(body.get("prompt"), "string", "EmbeddingRequest.prompt", "string")
    requested = body.get("model") or ""
    if not requested:
        raise OllamaError(400, "model is required")
    name = state.require_installed(requested)
    options = check_options(body.get("options"))
    keep_alive = state.keep_alive_for(body)
    model, _ = await state.acquire(name, state.context_for(name, options))
    try:
        if not body.get("prompt"):
            return web.json_response({"embedding": []})
        return web.json_response({"embedding": _text.embedding(body["prompt"])})
    finally:
        state.release(name, model, keep_alive)


# ---------------------------------------------------------------- commands


async def serve() -> int:
    host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    log(f"server config env=map[OLLAMA_HOST:http://{host}:{port} OLLAMA_MODELS:{os.environ.get('OLLAMA_MODELS', '')} "
        f"OLLAMA_NUM_PARALLEL:{os.environ.get('OLLAMA_NUM_PARALLEL', '1')}]")
    state = FakeOllama()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.shutdown.set)
    stop_wait = asyncio.create_task(state.shutdown.wait())
    await asyncio.wait([stop_wait], timeout=env_float("FAKE_LOAD_SECONDS", 1.0))  # nothing listens yet
    if state.shutdown.is_set():
        if state.own_models_dir:
            shutil.rmtree(state.models_dir, ignore_errors=True)
        return 0
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        print(f"Error: listen tcp {host}:{port}: bind: {reason}", file=sys.stderr, flush=True)
        await runner.cleanup()
        if state.own_models_dir:
            shutil.rmtree(state.models_dir, ignore_errors=True)
        return 1
    log(f"Listening on {host}:{port} (version {VERSION})", source="routes.go:1331")
    expiry = asyncio.create_task(state.expire_loop())
    await stop_wait
    expiry.cancel()
    await runner.cleanup()
    state.unload_all()
    if state.own_models_dir:
        shutil.rmtree(state.models_dir, ignore_errors=True)
    return 0


def client_url(path: str) -> str:
    host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{port}{path}"


def pull_command(name: str) -> int:
    """`ollama pull NAME`: stream /api/pull and print progress (on stderr, like ollama)."""
    request = urllib.request.Request(client_url("/api/pull"), data=json.dumps({"model": name, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            for line in response:
                event = json.loads(line)
                if "error" in event:
                    print(f"Error: {event['error']}", file=sys.stderr, flush=True)
                    return 1
                status = event.get("status", "")
                if event.get("total"):
                    percent = 100 * event.get("completed", 0) // event["total"]
                    status = f"{status}: {percent:3d}% {event['total']} B"
                print(status, file=sys.stderr, flush=True)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        print(f"Error: {message}", file=sys.stderr, flush=True)
        return 1
    except (urllib.error.URLError, ConnectionError):
        print("Error: could not connect to ollama server, run 'ollama serve' to start it", file=sys.stderr, flush=True)
        return 1
    return 0


def version_command() -> int:
    """`ollama --version` asks the server; without one it only knows the client version."""
    try:
        with urllib.request.urlopen(client_url("/api/version"), timeout=2) as response:
            server_version = json.loads(response.read())["version"]
        print(f"ollama version is {server_version}")
    except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError):
        print("Warning: could not connect to a running Ollama instance")
        print(f"Warning: client version is {VERSION}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ollama", description="Large language model runner")
    parser.add_argument("-v", "--version", action="store_true", help="Show version information")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="Start ollama")
    pull_parser = commands.add_parser("pull", help="Pull a model from a registry")
    pull_parser.add_argument("model")
    args = parser.parse_args(argv)
    if args.version:
        return version_command()
    if args.command == "serve":
        return asyncio.run(serve())
    if args.command == "pull":
        return pull_command(args.model)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
