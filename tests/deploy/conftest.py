from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's `prometheus` package ships promtool; `make test` installs it (make system-deps)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("PROMTOOL NOT FOUND: the alert rules, their unit tests, prometheus.yml and the dashboard's "
                    "PromQL are NOT checked. Install it: apt-get install prometheus (or `make system-deps`).")
    return path
