"""Admission control: limits, backend slots and the fair queue (see base.py for the rules)."""

from __future__ import annotations

from typing import Any

from gateway.admission.base import Admission, Lease, Limits, Slot, Ticket, Usage
from gateway.admission.memory import MemoryAdmission
from gateway.config import Config


def open_admission(config: Config, redis_client: Any = None) -> Admission:
    # TODO(lead, this session): RedisAdmission for store.url; memory until it lands.
    return MemoryAdmission(max_depth=config.queue.max_depth)


__all__ = ["Admission", "Lease", "Limits", "MemoryAdmission", "Slot", "Ticket", "Usage", "open_admission"]
