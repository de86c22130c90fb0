"""Load generators wrk cannot be: open-loop latency, time to first token, held streams, tokens/s.

Standard library only (uvloop when importable). A minimal HTTP/1.1 client over asyncio streams
keeps the generator's own cost per request far below any HTTP library's, so on a 2-core machine
it steals little CPU from what it measures, and it timestamps the first SSE event exactly.

Modes (each prints one JSON object on stdout; bench/run.py runs them as subprocesses):

  openloop  Requests start on a fixed schedule (request i at t0 + i/rate) whatever the answers
            do: a slow response never delays the next send, so there is no coordinated
            omission (which `hey -q`, closed-loop per worker, has). Latency is measured from the
            moment the request is written (the scheduled start is up to ~1 ms earlier: the event
            loop's timer granularity; that figure is reported too, as latency_from_schedule_ms).
            With --stream, also the time to the first `data:` event (TTFT).
  hold      --clients streams opened over --ramp seconds and held to the end; counts errors
            and incomplete streams.
  tokens    --concurrency workers, each sending --requests streamed requests back to back;
            aggregate completion tokens/s from the usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, deque
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # still works, just costs a little more
    uvloop = None


class HTTPError(Exception):
    """A response that is not a usable answer; `kind` names the class of failure."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Result:
    __slots__ = ("status", "body", "first_event_at", "events", "done", "usage_tokens")

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.first_event_at: float | None = None
        self.events = 0
        self.done = False
        self.usage_tokens: int | None = None


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def request(self, head: bytes, body: bytes, stream: bool) -> Result:
        reused = self.writer is not None
        if not reused:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(head + body)
        try:
            header_block = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            if reused and not getattr(exc, "partial", b""):
                # The server closed the idle keep-alive connection (llama-server does after a
                # stream): nothing was processed, so send again on a new connection, as HTTP
                # clients do.
                return await self.request(head, body, stream)
            raise HTTPError("closed", type(exc).__name__) from None
        return await self._response(header_block, stream)

    async def _response(self, header_block: bytes, stream: bool) -> Result:
        reader = self.reader
        assert reader is not None
        res = Result()
        lines = header_block.split(b"\r\n")
        try:
            res.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.close()
            raise HTTPError("protocol", repr(lines[0][:80])) from None
        length = None
        chunked = False
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        scan = stream and 200 <= res.status < 300
        parts: list[bytes] = []
        try:
            if chunked:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers are expected
                        break
                    data = (await reader.readexactly(size + 2))[:-2]
                    if scan and res.first_event_at is None and b"data:" in data:
                        res.first_event_at = time.perf_counter()
                    parts.append(data)
            elif length is not None:
                parts.append(await reader.readexactly(length))
                if scan and b"data:" in parts[-1]:
                    res.first_event_at = time.perf_counter()
            else:
                close = True
                while data := await reader.read(65536):
                    if scan and res.first_event_at is None and b"data:" in data:
                        res.first_event_at = time.perf_counter()
                    parts.append(data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise HTTPError("truncated", type(exc).__name__) from None
        if close:
            self.close()
        res.body = b"".join(parts)
        if stream and 200 <= res.status < 300:
            _scan_events(res)
        return res


def _scan_events(res: Result) -> None:
    """Count data events, see [DONE], and take completion_tokens from the usage chunk."""
    for line in res.body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            res.done = True
            continue
        res.events += 1
        if b'"usage":{' in payload or b'"usage": {' in payload:
            try:
                usage = json.loads(payload).get("usage") or {}
                res.usage_tokens = int(usage.get("completion_tokens") or 0)
            except ValueError:
                pass


def build_request(url: str, key: str | None, model: str, stream: bool, max_tokens: int,
                  prompt: str, extra: dict | None = None) -> tuple[str, int, bytes, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload: dict = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    payload.update(extra or {})
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "")
            + "Accept: */*\r\n\r\n").encode()
    return host, port, head, body


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _summary_ms(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50": _pct(ms, 50), "p90": _pct(ms, 90), "p99": _pct(ms, 99),
            "max": max(ms) if ms else None, "mean": sum(ms) / len(ms) if ms else None}


# --- modes ---------------------------------------------------------------------------------------


async def openloop(args: argparse.Namespace) -> dict:
    host, port, head, body = build_request(args.url, args.key, args.model, args.stream, args.max_tokens, args.prompt)
    idle: deque[Connection] = deque()
    opened = 0
    errors: Counter[str] = Counter()
    latency: list[float] = []
    ttft: list[float] = []
    from_schedule: list[float] = []
    statuses: Counter[int] = Counter()

    async def one(scheduled: float, record: bool) -> None:
        nonlocal opened
        conn = idle.pop() if idle else None
        if conn is None:
            conn = Connection(host, port)
            opened += 1
        sent = time.perf_counter()
        try:
            res = await asyncio.wait_for(conn.request(head, body, args.stream), args.timeout)
        except asyncio.TimeoutError:
            conn.close()
            if record:
                errors["timeout"] += 1
            return
        except (HTTPError, OSError, ValueError) as exc:
            conn.close()
            if record:
                errors[getattr(exc, "kind", type(exc).__name__)] += 1
            return
        end = time.perf_counter()
        if conn.writer is not None:
            idle.append(conn)
        if not record:
            return
        statuses[res.status] += 1
        if not 200 <= res.status < 300:
            errors[f"status_{res.status}"] += 1
            return
        if args.stream and not res.done:
            errors["incomplete_stream"] += 1
            return
        latency.append(end - sent)
        from_schedule.append(end - scheduled)
        if args.stream and res.first_event_at is not None:
            ttft.append(res.first_event_at - sent)

    # Warm-up: open a few connections and exercise both ends' code paths, unrecorded.
    await asyncio.gather(*(one(time.perf_counter(), False) for _ in range(args.warmup_conns)))
    for _ in range(args.warmup):
        await one(time.perf_counter(), False)

    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    tasks: set[asyncio.Task] = set()
    lag: list[float] = []
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = t0 + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(time.perf_counter() - scheduled)
        task = asyncio.create_task(one(scheduled, True))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.perf_counter() - t0
    if tasks:
        done, pending = await asyncio.wait(set(tasks), timeout=args.grace)
        for task in pending:
            task.cancel()
        errors["unfinished"] += len(pending)
    elapsed = time.perf_counter() - t0
    for conn in idle:
        conn.close()
    return {
        "mode": "openloop", "stream": args.stream, "rate": args.rate, "duration": args.duration,
        "requests": total, "ok": len(latency), "errors": dict(errors), "connections_opened": opened,
        "statuses": {str(k): v for k, v in statuses.items()},
        "achieved_send_rate": total / sent_for if sent_for > 0 else None,
        "completion_rate": len(latency) / elapsed if elapsed > 0 else None,
        "latency_ms": _summary_ms(latency), "latency_from_schedule_ms": _summary_ms(from_schedule),
        "ttft_ms": _summary_ms(ttft) if args.stream else None,
        "schedule_lag_ms": _summary_ms(lag),
    }


async def hold(args: argparse.Namespace) -> dict:
    host, port, head, body = build_request(args.url, args.key, args.model, True, args.max_tokens, args.prompt)
    errors: Counter[str] = Counter()
    ok = 0
    events: Counter[int] = Counter()
    ttft: list[float] = []
    durations: list[float] = []
    in_flight = 0
    peak = 0
    spacing = args.ramp / max(1, args.clients)

    async def client(i: int) -> None:
        nonlocal ok, in_flight, peak
        await asyncio.sleep(i * spacing)
        conn = Connection(host, port)
        start = time.perf_counter()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            res = await asyncio.wait_for(conn.request(head, body, True), args.timeout)
        except asyncio.TimeoutError:
            errors["timeout"] += 1
            return
        except (HTTPError, OSError, ValueError) as exc:
            errors[getattr(exc, "kind", type(exc).__name__)] += 1
            return
        finally:
            in_flight -= 1
            conn.close()
        if not 200 <= res.status < 300:
            errors[f"status_{res.status}"] += 1
        elif not res.done:
            errors["incomplete_stream"] += 1
        else:
            ok += 1
            events[res.events] += 1
            durations.append(time.perf_counter() - start)
            if res.first_event_at is not None:
                ttft.append(res.first_event_at - start)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return {
        "mode": "hold", "clients": args.clients, "ok": ok, "errors": dict(errors),
        "peak_open_streams": peak, "events_per_stream": {str(k): v for k, v in sorted(events.items())},
        "ttft_ms": _summary_ms(ttft), "stream_ms": _summary_ms(durations),
        "elapsed_s": time.perf_counter() - started,
    }


async def tokens(args: argparse.Namespace) -> dict:
    host, port, head, body = build_request(
        args.url, args.key, args.model, True, args.max_tokens, args.prompt,
        extra={"temperature": 0, "seed": 1})
    errors: Counter[str] = Counter()
    produced = 0
    requests_ok = 0
    missing_usage = 0

    async def worker() -> None:
        nonlocal produced, requests_ok, missing_usage
        conn = Connection(host, port)
        for _ in range(args.requests):
            try:
                res = await asyncio.wait_for(conn.request(head, body, True), args.timeout)
            except asyncio.TimeoutError:
                conn.close()
                errors["timeout"] += 1
                continue
            except (HTTPError, OSError, ValueError) as exc:
                errors[getattr(exc, "kind", type(exc).__name__)] += 1
                continue
            if not 200 <= res.status < 300 or not res.done:
                errors["incomplete_stream" if 200 <= res.status < 300 else f"status_{res.status}"] += 1
                continue
            requests_ok += 1
            if res.usage_tokens is None:
                missing_usage += 1
            produced += res.usage_tokens or 0
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "mode": "tokens", "concurrency": args.concurrency, "requests_ok": requests_ok, "errors": dict(errors),
        "completion_tokens": produced, "missing_usage": missing_usage, "elapsed_s": elapsed,
        "tokens_per_s": produced / elapsed if elapsed > 0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["openloop", "hold", "tokens"])
    parser.add_argument("--url", required=True, help="full URL of /v1/chat/completions")
    parser.add_argument("--key", default=None, help="bearer token")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--prompt", default="Say hello in eight words.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="openloop: streamed requests, measure TTFT")
    parser.add_argument("--rate", type=float, default=200.0, help="openloop: requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="openloop: seconds of sending")
    parser.add_argument("--grace", type=float, default=15.0, help="openloop: seconds to wait for stragglers")
    parser.add_argument("--warmup", type=int, default=50, help="openloop: unrecorded requests first")
    parser.add_argument("--warmup-conns", type=int, default=8, help="openloop: connections opened first")
    parser.add_argument("--clients", type=int, default=1000, help="hold: concurrent streams")
    parser.add_argument("--ramp", type=float, default=2.0, help="hold: seconds over which streams open")
    parser.add_argument("--concurrency", type=int, default=2, help="tokens: parallel workers")
    parser.add_argument("--requests", type=int, default=8, help="tokens: requests per worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    args = parser.parse_args(argv)
    run = {"openloop": openloop, "hold": hold, "tokens": tokens}[args.mode]
    result = uvloop.run(run(args)) if uvloop is not None else asyncio.run(run(args))
    result["uvloop"] = uvloop is not None
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
