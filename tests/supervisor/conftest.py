from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse
from gateway.supervisor import Supervisor

MakeSupervisor = Callable[..., Awaitable[Supervisor]]


@pytest.fixture
async def supervise(tmp_path: Path) -> AsyncIterator[MakeSupervisor]:
    """Supervisors in this process over the given backend configs; all stopped at the end."""
    made: list[Supervisor] = []

    async def make(*backends: dict[str, Any], start: bool = True, **sections: Any) -> Supervisor:
        raw = {"data_dir": str(tmp_path / f"data{len(made)}"), "backends": list(backends), **sections}
        supervisor = Supervisor(parse(raw, base_dir=tmp_path, env={}))
        made.append(supervisor)
        if start:
            await supervisor.start()
        return supervisor

    yield make
    for supervisor in made:
        await asyncio.wait_for(supervisor.stop(), 30)
