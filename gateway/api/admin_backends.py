"""Admin API for backends: state, logs, start/stop/restart (issue 3 fills this in)."""

ROUTES: list[object] = []
