"""A reload as the supervisor applies it, as an operator reads it in the backends' logs."""

from __future__ import annotations

from pathlib import Path

from gateway.config import parse
from gateway.supervisor import State
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import fake, until


def stops(lines: list[str]) -> list[str]:
    return [line for line in lines if "-> stopping" in line]


async def test_a_reload_says_it_stopped_what_it_changed_or_removed_and_only_a_shutdown_says_shutting_down(
        supervise: MakeSupervisor, tmp_path: Path) -> None:
    sup = await supervise(fake("changed"), fake("removed"))
    old_changed, removed = sup.backends["changed"], sup.backends["removed"]
    assert old_changed.ready and removed.ready

    config = parse({"data_dir": str(tmp_path / "data0"), "backends": [fake("changed", slots=2)]},
                   base_dir=tmp_path, env={})
    summary = await sup.apply(config)
    assert (summary["changed"], summary["removed"]) == (["changed"], ["removed"])
    assert await until(lambda: old_changed.state is State.STOPPED and removed.state is State.STOPPED, 10)
    assert stops(old_changed.log.tail(100)) == ["[gateway] ready -> stopping (changed by a reload)"]
    assert stops(removed.log.tail(100)) == ["[gateway] ready -> stopping (removed by a reload)"]

    new_changed = sup.backends["changed"]
    assert await until(lambda: new_changed.ready, 10), new_changed.describe()
    await sup.stop()
    assert stops(new_changed.log.tail(100)) == ["[gateway] ready -> stopping (gateway shutting down)"]
