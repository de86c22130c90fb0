"""A gateway told to stop (SIGTERM): what only waits is answered at once, 503 to retry
elsewhere; what runs finishes within the grace period, or hears why it was cut."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

import httpx

from tests.api.test_v1_accounting import CHAT, _Runtime
from tests.conftest import StartGateway


def test_queued_requests_get_a_503_at_once_and_cut_streams_an_error_event(start_gateway: StartGateway) -> None:
    runtime = ThreadingHTTPServer(("127.0.0.1", 0), _Runtime)
    threading.Thread(target=runtime.serve_forever, daemon=True).start()
    try:
        gateway = start_gateway({
            "backends": [{"name": "one-slot", "runtime": "openai", "url": f"http://127.0.0.1:{runtime.server_port}",
                          "serves": ["long", "fast"], "slots": 1, "stop_timeout": "1s"}],  # grace: 6 s
            "queue": {"max_wait": "60s"}})
        key = gateway.new_key()
        headers = {"authorization": f"Bearer {key}"}
        stream: list[str] = []
        queued: dict[str, Any] = {}

        def read_stream() -> None:
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                              json={"model": "long", "messages": CHAT, "stream": True}) as r:
                stream.extend(line for line in r.iter_lines() if line)

        def wait_in_queue() -> None:
            r = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": "fast", "messages": CHAT})
            queued.update(status=r.status_code, headers=r.headers, body=r.text, at=time.monotonic())

        streaming = threading.Thread(target=read_stream)
        streaming.start()
        time.sleep(0.5)  # the stream holds the only slot
        waiting = threading.Thread(target=wait_in_queue)
        waiting.start()
        time.sleep(0.5)
        stopped_at = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        waiting.join(10)
        assert queued["status"] == 503, queued
        assert queued["at"] - stopped_at < 2.0  # at once, not at the end of the grace period
        assert queued["headers"]["retry-after"] == "1"
        assert "shutting down" in json.loads(queued["body"])["error"]["message"]
        streaming.join(30)
        assert not streaming.is_alive()
        assert stream[-1] == "data: [DONE]", stream[-3:]
        assert "shutting down" in json.loads(stream[-2].removeprefix("data: "))["error"]["message"]
        assert len(stream) < 400  # it was cut, not finished
        assert gateway.proc.wait(30) in (0, -15)
    finally:
        runtime.shutdown()
        runtime.server_close()
