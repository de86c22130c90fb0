"""Reads each ready backend's own load report every few seconds (llama.cpp `/slots`, vLLM
`/metrics`), so routing sees load the gateway did not cause (other clients, other replicas without
shared Redis, the runtime's own queue). Seconds, not the 30 s some routers use: a report that old
says nothing about where the next request should go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from adapters.base import Load
from gateway import metrics
from gateway.upstream import auth_headers, read_probe

log = logging.getLogger("gateway.loadwatch")


class LoadWatch:
    def __init__(self, backends: Iterable[Any], interval: float) -> None:
        self._backends = list(backends)
        self.interval = interval
        self.loads: dict[str, Load] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Always: a reload may add a backend that reports its load to a gateway that had none.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8, force_close=True))
        self._task = asyncio.create_task(self._run(), name="load-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def replace(self, backends: Iterable[Any]) -> None:
        self._backends = list(backends)
        names = {b.name for b in self._backends}
        self.loads = {k: v for k, v in self.loads.items() if k in names}

    async def _run(self) -> None:
        while True:
            sampled = [b for b in self._backends if b.adapter.load_path]
            results = await asyncio.gather(*(self._sample(b) for b in sampled), return_exceptions=True)
            for backend, result in zip(sampled, results):
                if isinstance(result, Exception):  # a bug in reading one report must not end the watch
                    self._drop(backend)
                    log.error("load report from %s could not be read", backend.name, exc_info=result)
            await asyncio.sleep(self.interval)

    def _drop(self, backend: Any) -> None:
        """No load report from it (not ready, or none that could be read): routing and the
        dashboards stop using its last one, which would otherwise stay for ever."""
        if self.loads.pop(backend.name, None) is not None:
            metrics.backend_load.remove_by_labels({"backend": backend.name})

    async def _sample(self, backend: Any) -> None:
        assert self._session is not None
        if not backend.ready:
            self._drop(backend)
            return
        try:
            async with self._session.get(backend.url + backend.adapter.load_path, headers=auth_headers(backend.config),
                                         timeout=aiohttp.ClientTimeout(total=self.interval)) as resp:
                load = backend.adapter.load(resp.status, await read_probe(resp))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.debug("load report from %s failed: %s", backend.name, exc)
            self._drop(backend)  # an old report would steer routing on stale news
            return
        if load is None:
            self._drop(backend)
            return
        self.loads[backend.name] = load
        runtime = backend.config.runtime
        for kind in ("running", "waiting", "kv_cache_usage_ratio"):
            value = getattr(load, kind)
            if value is not None:
                metrics.backend_load.labels(backend.name, runtime, kind).set(value)
