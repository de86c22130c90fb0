"""An attached server's model list against the names the config says it serves: a name it does not
have is said at once (the log, /admin/backends), rather than found by every request it fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import FAKES, free_port, server_by_hand
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import until


@pytest.mark.parametrize("runtime", ["openai", "vllm"])
async def test_a_name_the_attached_server_does_not_list_is_reported_missing(
        supervise: MakeSupervisor, tmp_path: Path, runtime: str, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with server_by_hand([sys.executable, str(FAKES / "fake_vllm.py"), "serve", "fake-model", "--host", "127.0.0.1",
                         "--port", str(port), "--served-model-name", "qwen"], f"http://127.0.0.1:{port}",
                        ready_path="/health", env={"FAKE_LOAD_SECONDS": "0.1"},
                        log_path=tmp_path / "vllm.log", what="fake vLLM"):
        sup = await supervise({"name": "far", "runtime": runtime, "url": f"http://127.0.0.1:{port}",
                               "serves": ["qwen", "qwen2"], "health_interval": "0.1s"})
        backend = sup.backends["far"]
        assert await until(lambda: backend.ready and backend.missing_models, 5), backend.describe()
        assert backend.missing_models == ["qwen2"] and backend.describe()["missing_models"] == ["qwen2"]
        assert any("does not have qwen2" in r.getMessage() for r in caplog.records)
