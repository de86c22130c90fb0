"""Admission's whole Redis keyspace, in one screen (the store's keys are in gateway/keyspace.py).

Nothing here outlives its use: leases and queue entries are zset members scored by their expiry
(the Redis server's clock, ms), in containers whose TTL every write or renewal pushes to one lease
TTL ahead, so a replica killed with SIGKILL leaves nothing behind after `lease_ttl`; the rate logs
live one window after their last grant; Redis deletes an emptied zset, hash or list by itself.

The same names are rendered into the Lua scripts (`K.slots(backend)`, `K.queue`, ...) by
`lua_prelude()`, so Python and Lua cannot spell a key differently.
"""

from __future__ import annotations

PREFIX = "gw:adm:"

#   name      template            type  members / value                what it is for
SLOTS = "slots:{backend}"      # zset  lease -> expiry               requests running on a backend (<= its slots)
RUN = "run:{key}"              # zset  lease -> expiry               requests running for an API key (max_concurrency)
LOG = "log:{key}"              # zset  lease -> grant time           the key's grants in the window (rpm)
COST = "cost:{key}"            # hash  lease -> tokens, "=sum"       the same grants' tokens and their total (tpm)
VT = "vt:{key}"                # str   virtual time                  token cost the key was served (fair queuing)
VNOW = "vnow"                  # str   virtual time                  the queue's: start tag of the last grant
QUEUE = "queue"                # zset  entry -> expiry               every waiting request (ZCARD: the depth)
TICKETS = "tickets"            # hash  entry -> "sig\n{json}"         what each waiting request asks for
FAIR = "fair"                  # zset  key -> virtual time           keys with waiting requests, fairest first
KQ = "kq:{key}"                # zset  entry -> order                one key's waiting requests: priority, arrival
MOVERS = "movers"              # zset  lease -> arrival              failovers waiting for a slot (served first)
MOVES = "moves"                # hash  lease -> "{json}"             where each of them may go, and from where
NOTIFY = "notify:{replica}"    # list  "g|m\tlease\tbackend\t..."    grants and moves for one replica (BLMPOP)
PROBE = "probe:{replica}"      # str   "1", expires in seconds       the circuit's probe: a write, as admission's are

ALL = {"slots": SLOTS, "run": RUN, "log": LOG, "cost": COST, "vt": VT, "vnow": VNOW, "queue": QUEUE,
       "tickets": TICKETS, "fair": FAIR, "kq": KQ, "movers": MOVERS, "moves": MOVES, "notify": NOTIFY}


def key(template: str, arg: str = "") -> str:
    """The full name: key(SLOTS, "b1") -> "gw:adm:slots:b1"."""
    head, brace, _ = template.partition("{")
    return PREFIX + head + (arg if brace else "")


def lua_prelude() -> str:
    """`local K = {...}`: the keyspace as the scripts see it."""
    lines = ["local K = {}"]
    for name, template in ALL.items():
        head, brace, _ = template.partition("{")
        if brace:
            lines.append(f"K.{name} = function(x) return '{PREFIX}{head}' .. x end")
        else:
            lines.append(f"K.{name} = '{PREFIX}{template}'")
    return "\n".join(lines) + "\n"
