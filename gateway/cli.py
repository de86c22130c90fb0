"""`gateway serve | check`: the operator's entry points."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import Any

from gateway import keys_cli, logsetup
from gateway.config import Config, ConfigError, keyless_exposure, load, warnings, without_password

log = logging.getLogger("gateway")

EXIT_CONFIG = 2
EXIT_STARTUP = 3  # as uvicorn's own

# A force quit (a second Ctrl-C) skips the lifespan shutdown; Server.keep_usage does its part for
# the usage, and the quit stays prompt: at most ~3 s in all. The requests it cuts record their
# usage on their way out, within a second (a stream's last words to its client are bounded at 1 s:
# gateway/api/v1.py, _last_words); then the store is given what is held, as at a normal shutdown.
FORCE_QUIT_REQUESTS_TIMEOUT = 1.5
FORCE_QUIT_FLUSH_TIMEOUT = 1.5


def _load_or_exit(path: str | None) -> Config:
    path = path or os.environ.get("GATEWAY_CONFIG")
    if not path:
        print("error: no config file: pass --config FILE or set GATEWAY_CONFIG", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    try:
        return load(path)
    except ConfigError as exc:
        print(f"error: invalid config {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def serve(args: argparse.Namespace) -> None:
    config = file_config = _load_or_exit(args.config)
    server = config.server.model_copy(update={
        k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None
    })
    config = config.model_copy(update={"server": server})
    # The file's ports were checked against its own server.port; --port is checked here.
    clash = [b.name for b in config.backends if b.url is None and b.port == server.port]
    if clash:
        print(f"error: port {server.port} is also backend {clash[0]}'s fixed port.", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    if (refusal := keyless_exposure(config.auth, server.host)) is not None:  # the file's host is checked in load()
        print(f"error: --host: {refusal}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    log_config = logsetup.configure(server.log_level, server.log_format)
    log.info("config %s; store: %s; admin API %s", args.config or os.environ.get("GATEWAY_CONFIG"),
             _shown_store(config), "on" if config.admin.key else "off")
    for b in config.backends:
        log.info("backend %s (%s) serves %s: %s", b.name, b.runtime, ", ".join(b.serves),
                 without_password(b.url) if b.url else f"managed, model {b.model}")
    for warning in warnings(config):
        log.warning("config: %s", warning)
    # Bound before the lifespan starts the backends (uvicorn binds after it): a port in use is
    # told at once, not after a model has loaded, and a restart loop reloads no model.
    listening = _listen(server.host, server.port)

    import uvicorn

    from gateway.app import create_app
    from gateway.protocol import http_protocol

    try:
        # Private: it holds keys' hashes, usage and the runtimes' logs. One that exists keeps the
        # mode its operator gave it (gateway/store/sqlite.py, make_private).
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        app = create_app(config, args.config or os.environ.get("GATEWAY_CONFIG"), file_config)  # makes data_dir/logs
    except OSError as exc:  # one line, as a start that fails later says it (app.CANNOT_START)
        log.error("The gateway cannot start: %s (%s): data_dir must be a directory the gateway's user can write",
                  exc.filename or config.data_dir, exc.strerror or exc)
        raise SystemExit(EXIT_STARTUP) from None
    gateway = app.app.state.gateway  # (the FrontDoor create_app returns wraps the Litestar app)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Before uvicorn waits out the requests in flight: the ones that only wait in the
            # queue are answered now (503, retry elsewhere) rather than cut at the grace period.
            gateway.begin_shutdown()
            await super().shutdown(sockets)
            # uvicorn skips the lifespan shutdown on a force quit that came before it; one that
            # came while it ran let it run to its end (and the usage be written).
            if self.force_exit and not gateway.usage.stopped:
                await self.keep_usage()

        async def keep_usage(self) -> None:
            """What the skipped lifespan shutdown would have kept: the usage of the requests still
            running (cut now: their cancel paths record it) and of those that finished since the
            last flush. Each wait bounded. The backends are left to their keepers, which stop them
            when this process exits (gateway/supervisor/keeper.py)."""
            tasks = list(self.server_state.tasks)
            log.warning("force quit: cutting %d requests in flight and writing the usage held", len(tasks))
            for task in tasks:
                task.cancel()
            if tasks:
                _, running = await asyncio.wait(tasks, timeout=FORCE_QUIT_REQUESTS_TIMEOUT)
                if running:
                    log.error("force quit: %d requests still ran after %g s; usage they had not recorded is lost",
                              len(running), FORCE_QUIT_REQUESTS_TIMEOUT)
            await gateway.usage.stop(FORCE_QUIT_FLUSH_TIMEOUT)

    uvicorn_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=http_protocol(server.read_timeout),  # httptools, with bounds on receiving a request
        log_level=server.log_level,
        log_config=log_config,
        # Per-request lines come from the gateway itself (with request id, key id, backend).
        access_log=False,
        # Nothing reads the client's address (limits are per key), so X-Forwarded-For need not be
        # parsed on every request; and the server's name is not advertised.
        proxy_headers=False,
        server_header=False,
        # Longer than clients' and load balancers' idle timeouts (httpx 5 s, nginx 60 s), so the
        # client is the one that closes an idle connection: a server closing it at the instant the
        # client reuses it fails that request.
        timeout_keep_alive=65,
        # The lifespan stops every backend; give it their grace periods to do so.
        timeout_graceful_shutdown=max(b.stop_timeout for b in config.backends) + 5,
    )
    runner = Server(uvicorn_config)
    gateway.requests = runner.server_state.tasks
    try:
        runner.run(sockets=[listening])
    except KeyboardInterrupt:  # as uvicorn.run
        pass
    if not runner.started:  # as uvicorn.run: the start failed (its log says why)
        raise SystemExit(EXIT_STARTUP)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind((host, port))
    except OSError as exc:
        log.error("The gateway cannot listen on %s:%d (server.host, server.port): %s", host, port,
                  exc.strerror or exc)
        raise SystemExit(EXIT_STARTUP) from None
    # (uvicorn given a socket does not say where it listens)
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (answering once started)", shown, sock.getsockname()[1])
    return sock


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def check(args: argparse.Namespace) -> None:
    config = _load_or_exit(args.config)
    print(f"config ok: {args.config or os.environ.get('GATEWAY_CONFIG')}")
    print(f"data_dir: {config.data_dir}")
    print(f"listen:   {config.server.host}:{config.server.port}")
    print(f"store:    {_shown_store(config)}")
    print(f"admin API: {'on' if config.admin.key else 'off (admin.key unset)'}")
    print("backends:")
    for b in config.backends:
        where = b.url if b.url else f"managed, model {b.model}"
        print(f"  {b.name:<20} {b.runtime:<9} slots={b.slots:<3} serves={','.join(b.serves)}  ({where})")
    print("models:")
    for b in config.backends:
        for name in b.serves:
            print(f"  {name} -> {b.name}")
    for alias, target in config.models.aliases.items():
        print(f"  {alias} -> {target} (alias)")
    for warning in warnings(config):
        print(f"warning: {warning}", file=sys.stderr)


def _shown_store(config: Config) -> str:
    if config.store.url is None:
        return f"embedded (SQLite, {config.data_dir / 'gateway.db'})"
    return "redis " + without_password(config.store.url)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway for local LLM runtimes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="start the gateway")
    p_serve.add_argument("--config", help="config file (or GATEWAY_CONFIG)")
    p_serve.add_argument("--host", help="override server.host")
    p_serve.add_argument("--port", type=_port, help="override server.port")
    p_serve.set_defaults(func=serve)

    p_check = sub.add_parser("check", help="validate a config and print what it resolves to")
    p_check.add_argument("--config", help="config file (or GATEWAY_CONFIG)")
    p_check.set_defaults(func=check)

    keys_cli.add_parser(sub)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
