"""A reload that changes `routing` takes effect: the affinity header, the cooldown thresholds and
the load interval were built once at start, and only max_attempts followed a reload."""

from __future__ import annotations

import httpx
import yaml

from tests.api.test_routing import fake_vllm, served_by
from tests.conftest import StartGateway


def test_a_reloaded_affinity_header_is_the_one_followed(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake_vllm("a", ["m"]), fake_vllm("b", ["m"]), fake_vllm("c", ["m"])]})
    key = gateway.new_key()
    config = yaml.safe_load(gateway.config_path.read_text())
    config["routing"] = {"affinity_header": "x-conv"}
    gateway.config_path.write_text(yaml.safe_dump(config))
    reloaded = gateway.admin("POST", "/admin/reload")
    assert reloaded.status_code == 200, reloaded.text

    backends_of: dict[str, set[str]] = {}
    with httpx.Client(base_url=gateway.url, timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for conversation in (f"conversation-{i}" for i in range(8)):
            for _ in range(3):
                before = served_by(gateway)
                r = client.post("/v1/chat/completions", headers={"x-conv": conversation},
                                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                after = served_by(gateway)
                backends_of.setdefault(conversation, set()).update(
                    name for name, count in after.items() if count > before.get(name, 0))
    # Each conversation stays on one backend, and the conversations spread over the backends
    # (with the header not followed, sequential requests all tie on the first backend).
    assert all(len(names) == 1 for names in backends_of.values()), backends_of
    assert len(set().union(*backends_of.values())) >= 2, backends_of
