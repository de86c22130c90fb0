"""Admission control: limits, backend slots and the fair queue (see base.py for the rules)."""

from __future__ import annotations

from typing import Any

from gateway.admission.base import Admission, Lease, Limits, Slot, Ticket, Usage
from gateway.admission.memory import MemoryAdmission
from gateway.config import Config


def open_admission(config: Config, redis_client: Any = None) -> Admission:
    """One Redis for every replica when the store is Redis; otherwise in this process."""
    queue = config.queue
    if config.store.url and redis_client is not None:
        from gateway.admission.redis import RedisAdmission

        return RedisAdmission(redis_client, max_depth=queue.max_depth, max_per_key=queue.max_per_key,
                              lease_ttl=queue.lease_ttl, failure_mode=queue.redis_failure, replicas=queue.replicas)
    return MemoryAdmission(max_depth=queue.max_depth, max_per_key=queue.max_per_key)


__all__ = ["Admission", "Lease", "Limits", "MemoryAdmission", "Slot", "Ticket", "Usage", "open_admission"]
