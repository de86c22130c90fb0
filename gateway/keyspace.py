"""Every Redis key the gateway uses, in one screen. `{prefix}` isolates installations sharing a Redis.

Store (keys and usage):
    {p}schema                string  the version of this layout, SET NX by the first gateway to open
                                     the store; one newer than a gateway knows keeps it from starting
    {p}store:id              string  "{created, by Redis's clock}:{random}", SET NX at open: gone or
                                     replaced later, Redis lost the data (gateway/store/redis_mark.py)
    {p}key:{id}              string  JSON record of one API key (hash of the secret, never the secret)
    {p}keys                  zset    key ids by creation time
    {p}keys:changed          channel key ids changed by any replica (pub/sub)
    {p}keys:version          string  INCR with every key write, in its MULTI: shows a replica that
                                     pub/sub lost a change (absent: 0)
    {p}usage:{hour}          hash    "{key_id}|{model}|{field}" -> count, for that hour; expires
                                     store.usage_retention after the hour ends
    {p}usage:hours           zset    the hours that have usage (expired ones swept hourly)
    {p}usage:batch:{id}      string  set when that usage batch was applied (a retry finds it); expires
    {p}keys:last_used        zset    key id -> last use (unix seconds)

Admission (limits, slots and the queue) lives under {p}adm:..., listed in gateway/admission/keys.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keyspace:
    prefix: str = "gw:"

    @property
    def schema(self) -> str:
        return f"{self.prefix}schema"

    @property
    def store_id(self) -> str:
        return f"{self.prefix}store:id"

    def key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    @property
    def keys(self) -> str:
        return f"{self.prefix}keys"

    @property
    def keys_changed(self) -> str:
        return f"{self.prefix}keys:changed"

    @property
    def keys_version(self) -> str:
        return f"{self.prefix}keys:version"

    def usage(self, hour: int) -> str:
        return f"{self.prefix}usage:{hour}"

    def usage_batch(self, batch_id: str) -> str:
        return f"{self.prefix}usage:batch:{batch_id}"

    @property
    def usage_hours(self) -> str:
        return f"{self.prefix}usage:hours"

    @property
    def last_used(self) -> str:
        return f"{self.prefix}keys:last_used"
