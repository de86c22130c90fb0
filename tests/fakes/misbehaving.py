#!/usr/bin/env python3
"""A tiny llama.cpp-like server that misbehaves on demand, for supervisor tests.

    python tests/fakes/misbehaving.py --port N --mode MODE [--host H] [--pid-file F] [--alias NAME]

Like llama-server (shared/reference/runtimes.md) it binds its port AT ONCE and answers every path
with 503 {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}} while
"loading" (FAKE_LOAD_SECONDS, default 1.0); then GET /health (and /v1/health) is 200 {"status": "ok"}.
POST /v1/chat/completions answers a small valid completion (stream or not, usage included).
Other llama-server flags (-m, -c, -np, --metrics, ...) are accepted and ignored.

Modes:
  ok           well behaved; exits 0 on SIGTERM
  exit         prints "error: failed to load model ..." to stderr and exits 1 at once (never binds)
  never_ready  binds, then answers 503 "Loading model" forever
  ignore_term  ready as usual, but ignores SIGTERM (only SIGKILL stops it)
  grandchild   ready; spawns a grandchild that sleeps forever (same process group, no pipes) and
               writes its pid to --pid-file; SIGTERM ends this process only
  hang_health  ready for FAKE_HEALTHY_SECONDS (default 2), then /health never answers (the handler
               blocks forever) while the other endpoints keep working
  hold_pipes   ready; spawns a grandchild that INHERITS stdout/stderr and ignores SIGTERM (pid in
               --pid-file if given); this process exits on SIGTERM, the pipes stay open
  busy_health  ready for FAKE_HEALTHY_SECONDS (default 2), then /health answers 503 "no slot available"
               (older llama.cpp builds when every slot is busy) while the other endpoints keep working
  stuck_loading  ready for FAKE_HEALTHY_SECONDS (default 2), then every path answers 503 "Loading model"
               for good, as llama-server while it loads (a runtime wedged in a reload)
  escape       ready; spawns a grandchild that leaves the process group (its own session, no pipes)
               and ignores SIGTERM (pid in --pid-file); a group kill alone never reaches it
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find _text when imported too
import _text  # noqa: E402

MODES = ("ok", "exit", "never_ready", "ignore_term", "grandchild", "hang_health", "hold_pipes", "escape", "busy_health",
         "stuck_loading")
SLEEPER = "import time\nwhile True: time.sleep(3600)\n"
TERM_IGNORING_SLEEPER = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(3600)\n"
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
NO_SLOT = {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Behaviour:
    def __init__(self, args: argparse.Namespace):
        self.mode = args.mode
        self.model_id = args.alias or args.model or "misbehaving"
        self.started = time.monotonic()
        self.load_seconds = env_float("FAKE_LOAD_SECONDS", 1.0)
        self.healthy_seconds = env_float("FAKE_HEALTHY_SECONDS", 2.0)
        self.token_delay = env_float("FAKE_TOKEN_DELAY", 0.005)

    def loading(self) -> bool:
        now, ready_at = time.monotonic(), self.started + self.load_seconds
        return self.mode == "never_ready" or now < ready_at or (
            self.mode == "stuck_loading" and now > ready_at + self.healthy_seconds)

    def health_hangs(self) -> bool:
        ready_at = self.started + self.load_seconds
        return self.mode == "hang_health" and time.monotonic() > ready_at + self.healthy_seconds

    def health_busy(self) -> bool:
        ready_at = self.started + self.load_seconds
        return self.mode == "busy_health" and time.monotonic() > ready_at + self.healthy_seconds


class Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour  # set in main()
    server_version = "llama.cpp"

    def log_message(self, fmt: str, *args) -> None:
        log(f"srv  log_server_r: request: {self.command} {self.path} {self.client_address[0]} {args[1] if len(args) > 1 else ''}")

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.behaviour.loading():
            return self.send_json(503, LOADING)
        path = self.path.split("?")[0]
        if path in ("/health", "/v1/health"):
            if self.behaviour.health_hangs():
                threading.Event().wait()  # never answers; other requests run in other threads
            if self.behaviour.health_busy():
                return self.send_json(503, NO_SLOT)
            return self.send_json(200, {"status": "ok"})
        if path in ("/models", "/v1/models"):
            return self.send_json(200, {"object": "list", "data": [
                {"id": self.behaviour.model_id, "object": "model", "created": int(time.time()),
                 "owned_by": "llamacpp", "meta": {"n_ctx_train": 4096}}]})
        self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.behaviour.loading():
            return self.send_json(503, LOADING)
        if self.path.split("?")[0] not in ("/v1/chat/completions", "/chat/completions"):
            return self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        try:
            body = json.loads(raw)
            messages = body["messages"]
            prompt = "\n".join(str(m.get("content") or "") for m in messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            return self.send_json(400, {"error": {"code": 400, "message": "Invalid request: 'messages' is required",
                                                  "type": "invalid_request_error"}})
        gen = _text.generate(prompt, body.get("seed") or 0, body.get("max_tokens") or body.get("max_completion_tokens"), [])
        usage = {"prompt_tokens": _text.count_tokens(prompt), "completion_tokens": gen.tokens,
                 "total_tokens": _text.count_tokens(prompt) + gen.tokens}
        model = body.get("model") or self.behaviour.model_id  # single-model mode echoes the request
        if body.get("stream"):
            return self.stream(gen, usage, model, bool((body.get("stream_options") or {}).get("include_usage")))
        time.sleep(self.behaviour.token_delay * gen.tokens)
        self.send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "b0000-fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": gen.finish_reason}],
            "usage": usage,
            "timings": {"prompt_n": usage["prompt_tokens"], "predicted_n": gen.tokens},
        })

    def stream(self, gen: _text.Generation, usage: dict, model: str, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def send(data: object) -> None:
            payload = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        send(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]))
        for piece in gen.pieces:
            time.sleep(self.behaviour.token_delay)
            send(dict(base, choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        send(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}]))
        if include_usage:
            send(dict(base, choices=[], usage=usage))
        send("[DONE]")


def spawn_grandchild(args: argparse.Namespace, hold_pipes: bool, escape: bool = False) -> None:
    if hold_pipes:  # inherits our stdout/stderr and shrugs off SIGTERM
        child = subprocess.Popen([sys.executable, "-c", TERM_IGNORING_SLEEPER, "misbehaving-grandchild"],
                                 stdin=subprocess.DEVNULL)
    elif escape:  # a session of its own: out of reach of killpg, and deaf to SIGTERM
        child = subprocess.Popen([sys.executable, "-c", TERM_IGNORING_SLEEPER, "misbehaving-grandchild"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    else:
        child = subprocess.Popen([sys.executable, "-c", SLEEPER, "misbehaving-grandchild"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(f"spawned grandchild pid {child.pid}")
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(f"{child.pid}\n")


def on_sigterm(signum, frame) -> None:
    log("received SIGTERM, shutting down")
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--pid-file", default=None)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--alias", default=None)
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        log(f"ignoring llama-server flags: {' '.join(ignored)}")

    if args.mode == "exit":
        log(f"llama_model_load: error loading model: failed to open {args.model or 'model.gguf'}")
        log("error: failed to load model")
        return 1

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.mode == "ignore_term" else on_sigterm)
    Handler.behaviour = Behaviour(args)
    server = ThreadingHTTPServer((args.host, args.port), Handler)  # bound now, before "loading"
    server.daemon_threads = True  # hung /health threads must not block exit
    if args.mode in ("grandchild", "hold_pipes", "escape", "busy_health"):
        spawn_grandchild(args, hold_pipes=args.mode == "hold_pipes", escape=args.mode == "escape")
    log(f"main: server is listening on http://{args.host}:{args.port} - starting the main loop (mode {args.mode})")
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
