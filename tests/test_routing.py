"""Routing rules, without processes: names, aliases, groups, load, weights, affinity, cooldowns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from adapters.base import Load
from gateway.errors import BackendUnavailable, ModelNotFound
from gateway.routing import Cooldowns, ModelTable, choose
from gateway.supervisor import State


@dataclass
class FakeConfig:
    serves: list[str]
    slots: int = 4
    weight: float = 1.0
    runtime: str = "llamacpp"


@dataclass
class FakeBackend:
    name: str
    config: FakeConfig
    inflight: int = 0
    state: State = State.READY
    reason: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state is State.READY


def backends(*specs: tuple[str, list[str]], **config: object) -> list[FakeBackend]:
    return [FakeBackend(name, FakeConfig(serves, **config)) for name, serves in specs]  # type: ignore[arg-type]


def test_names_aliases_and_groups() -> None:
    a, b, c = backends(("a", ["qwen"]), ("b", ["qwen"]), ("c", ["llama", "llama-big"]))
    table = ModelTable([a, b, c], {"gpt-4o-mini": "qwen"})
    route = table.resolve("gpt-4o-mini")
    assert (route.public, route.served, [x.name for x in route.backends]) == ("gpt-4o-mini", "qwen", ["a", "b"])
    assert [x.name for x in table.resolve("llama-big").backends] == ["c"]
    with pytest.raises(ModelNotFound):
        table.resolve("qwen-72b")
    assert sorted(table.listing()) == [("gpt-4o-mini", "llamacpp"), ("llama", "llamacpp"),
                                       ("llama-big", "llamacpp"), ("qwen", "llamacpp")]


def test_least_loaded_against_slots_and_weight() -> None:
    small, big = FakeBackend("small", FakeConfig(["m"], slots=1)), FakeBackend("big", FakeConfig(["m"], slots=8))
    route = ModelTable([small, big], {}).resolve("m")
    small.inflight, big.inflight = 0, 3
    assert [b.name for b in choose(route)] == ["small", "big"]  # 0/1 < 3/8
    small.inflight = 1
    assert [b.name for b in choose(route)] == ["big", "small"]  # 1/1 > 3/8
    heavy = FakeBackend("heavy", FakeConfig(["w"], slots=4, weight=3.0))
    light = FakeBackend("light", FakeConfig(["w"], slots=4, weight=1.0))
    heavy.inflight, light.inflight = 2, 1
    assert choose(ModelTable([light, heavy], {}).resolve("w"))[0].name == "heavy"  # 2/12 < 1/4


def test_reported_waiting_counts_as_load() -> None:
    a, b = backends(("a", ["m"]), ("b", ["m"]))
    route = ModelTable([a, b], {}).resolve("m")
    assert choose(route, loads={"a": Load(running=4, waiting=6)})[0].name == "b"


def test_only_ready_backends_and_a_clear_503() -> None:
    a, b = backends(("a", ["m"]), ("b", ["m"]))
    a.state, b.state = State.FAILED, State.STARTING
    with pytest.raises(BackendUnavailable) as info:
        choose(ModelTable([a, b], {}).resolve("m"))
    assert "a is failed, b is starting" in info.value.message
    b.state = State.READY
    assert [x.name for x in choose(ModelTable([a, b], {}).resolve("m"))] == ["b"]


def test_affinity_is_stable_and_spreads() -> None:
    group = backends(("a", ["m"]), ("b", ["m"]), ("c", ["m"]))
    route = ModelTable(group, {}).resolve("m")
    firsts = {session: choose(route, affinity=session)[0].name for session in (f"s{i}" for i in range(300))}
    for session, name in list(firsts.items())[:20]:
        group[0].inflight += 1  # load changes do not move a session
        assert choose(route, affinity=session)[0].name == name
    spread = Counter(firsts.values())
    assert set(spread) == {"a", "b", "c"} and min(spread.values()) > 60


def test_affinity_shares_follow_the_weights() -> None:
    light = FakeBackend("light", FakeConfig(["m"], weight=1.0))
    heavy = FakeBackend("heavy", FakeConfig(["m"], weight=3.0))
    route = ModelTable([light, heavy], {}).resolve("m")
    sessions = 4000
    spread = Counter(choose(route, affinity=f"session-{i}")[0].name for i in range(sessions))
    # weight's share: 3/4 (a score of weight * hash gave 5/6); sd of the share here is about 0.007
    assert abs(spread["heavy"] / sessions - 0.75) < 0.03, spread
    three = backends(("a", ["w"]), ("b", ["w"]), ("c", ["w"]))
    for backend, weight in zip(three, (1.0, 2.0, 3.0), strict=True):
        backend.config.weight = weight
    route = ModelTable(three, {}).resolve("w")
    spread = Counter(choose(route, affinity=f"session-{i}")[0].name for i in range(sessions))
    for name, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert abs(spread[name] / sessions - share) < 0.03, spread


def test_equal_loads_put_the_larger_weight_first() -> None:
    # Idle, or equally loaded against slots * weight: the one with more capacity leads, so one
    # request at a time goes to it rather than to the first in the config.
    light = FakeBackend("light", FakeConfig(["m"], slots=4, weight=1.0))
    heavy = FakeBackend("heavy", FakeConfig(["m"], slots=4, weight=3.0))
    route = ModelTable([light, heavy], {}).resolve("m")
    assert [b.name for b in choose(route)] == ["heavy", "light"]
    light.inflight, heavy.inflight = 1, 3  # 1/4 == 3/12
    assert [b.name for b in choose(route)] == ["heavy", "light"]
    light.inflight = 0
    assert [b.name for b in choose(route)] == ["light", "heavy"]  # load first: 0 < 3/12


def test_cooldown_takes_a_failing_backend_out_for_a_while() -> None:
    now = [0.0]
    cooldowns = Cooldowns(failures=3, window=10, cooldown=30, clock=lambda: now[0])
    a, b = backends(("a", ["m"]), ("b", ["m"]))
    route = ModelTable([a, b], {}).resolve("m")
    for _ in range(2):
        cooldowns.failed("a")
    assert {x.name for x in choose(route, cooldowns=cooldowns)} == {"a", "b"}
    cooldowns.failed("a")
    assert [x.name for x in choose(route, cooldowns=cooldowns)] == ["b"]
    b.state = State.FAILED  # alone, a cooling backend is still tried
    assert [x.name for x in choose(route, cooldowns=cooldowns)] == ["a"]
    b.state = State.READY
    now[0] = 31.0
    assert {x.name for x in choose(route, cooldowns=cooldowns)} == {"a", "b"}


def test_failures_outside_the_window_do_not_add_up() -> None:
    now = [0.0]
    cooldowns = Cooldowns(failures=2, window=5, cooldown=30, clock=lambda: now[0])
    cooldowns.failed("a")
    now[0] = 6.0
    cooldowns.failed("a")
    assert not cooldowns.cooling("a")
    cooldowns.succeeded("a")
    cooldowns.failed("a")
    assert not cooldowns.cooling("a")


def test_reset_ends_a_cooldown() -> None:
    cooldowns = Cooldowns(failures=1, window=10, cooldown=30)
    cooldowns.failed("a")
    assert cooldowns.cooling("a")
    cooldowns.reset("a")
    assert not cooldowns.cooling("a")


def test_a_backend_sits_out_the_wait_it_asked_for_never_less_and_at_most_cooldown() -> None:
    now = [0.0]
    cooldowns = Cooldowns(failures=3, window=10, cooldown=30, clock=lambda: now[0])
    cooldowns.rest("a", 20)  # its 429's retry-after: at once, not after three failures
    cooldowns.rest("a", 5)  # a shorter wait later does not cut the first short
    now[0] = 19.0
    assert cooldowns.cooling("a")
    now[0] = 20.0
    assert not cooldowns.cooling("a")
    cooldowns.rest("b", 3600)  # an hour asked: `cooldown` given
    now[0] = 49.0
    assert cooldowns.cooling("b")
    now[0] = 50.0
    assert not cooldowns.cooling("b")
