"""gateway/admission/scripts.py, the admission's scripts on a Redis connection of their own:
replies reach their own callers in a pipeline whose callers come and go; a script Redis lost is
loaded again; a Redis that stops answering fails the calls on time and the next call gets a new
connection; the URL's password and database are used, a wrong password is refused, and a
rediss:// URL is spoken over TLS with the certificates it names."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from gateway.admission.scripts import Scripts
from tests.conftest import RedisServer

ECHO = {"echo": "return ARGV", "put": "return redis.call('SET', 'scripts-test', ARGV[1])"}
MakeScripts = Callable[..., Scripts]


@pytest.fixture
async def make_scripts() -> AsyncIterator[MakeScripts]:
    made: list[Scripts] = []

    def make(url: str, timeout: float = 5.0) -> Scripts:
        made.append(Scripts(aioredis.ConnectionPool.from_url(url), ECHO, timeout=timeout, connect_timeout=5.0))
        return made[-1]

    yield make
    for scripts in made:
        scripts.close()


async def test_replies_reach_their_own_callers_while_some_stop_waiting(make_scripts: MakeScripts,
                                                                       redis_url: str) -> None:
    scripts = make_scripts(redis_url)
    assert await scripts.run("echo", ["first", 1, 2.5]) == [b"first", b"1", b"2.5"]  # (connected now)
    calls = [asyncio.create_task(scripts.run("echo", [i, f"x{i}"])) for i in range(60)]
    await asyncio.sleep(0)  # every call written; no reply read yet
    for call in calls[::3]:
        call.cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results):
        assert isinstance(result, asyncio.CancelledError) if i % 3 == 0 else result == [b"%d" % i, b"x%d" % i]
    assert await scripts.run("echo", ["after"]) == [b"after"]


async def test_a_script_redis_lost_is_loaded_again(make_scripts: MakeScripts, redis_url: str) -> None:
    scripts = make_scripts(redis_url)
    await scripts.load()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()  # as a restart without persistence does
        assert await scripts.run("echo", ["again"]) == [b"again"]
        assert await client.script_exists(*scripts._shas.values()) == [True, False]  # only the one run (echo)
    finally:
        await client.aclose()


async def test_a_redis_that_stops_answering_fails_calls_on_time_and_the_next_gets_a_new_connection(
        make_scripts: MakeScripts, redis_server: RedisServer, redis_url: str) -> None:
    scripts = make_scripts(redis_url, timeout=0.5)
    assert await scripts.run("echo", ["a"]) == [b"a"]
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        waiting = [asyncio.create_task(scripts.run("echo", [n])) for n in "bc"]
        for outcome in await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10):
            assert isinstance(outcome, TimeoutError) and "did not answer" in str(outcome), outcome
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await scripts.run("echo", ["d"]) == [b"d"]


async def test_the_url_s_password_and_database_are_used(make_scripts: MakeScripts, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="scripts-test-password")
    try:
        url = server.url.replace("/0", "/3")
        assert await make_scripts(url).run("put", ["in three"]) == b"OK"
        three, zero = aioredis.Redis.from_url(url), aioredis.Redis.from_url(server.url)
        try:
            assert (await three.get("scripts-test"), await zero.get("scripts-test")) == (b"in three", None)
        finally:
            await three.aclose()
            await zero.aclose()
        with pytest.raises(AuthenticationError):
            await make_scripts(url.replace("scripts-test-password", "wrong")).run("echo", ["x"])
    finally:
        server.kill()


async def test_a_rediss_url_is_spoken_over_tls_with_its_ca(make_scripts: MakeScripts, tmp_path: Path) -> None:
    # The connection's TLS context is redis-py's own for the URL (its ssl_* options).
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = RedisServer(tmp_path, tls=(cert, key))
    try:
        assert await make_scripts(server.url).run("echo", ["over tls"]) == [b"over tls"]
        with pytest.raises(ssl.SSLCertVerificationError):  # a server whose certificate it cannot verify
            await make_scripts(server.url.split("?")[0]).run("echo", ["x"])
    finally:
        server.kill()
