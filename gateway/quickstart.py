"""`make run`'s last step: wait for the gateway, issue a day-long key, print a curl line that works.

Run in the background beside `gateway serve`; bounded: gives up after `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{args.url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        print(f"quickstart: the gateway was not ready after {args.timeout:g}s; see its log above", file=sys.stderr)
        raise SystemExit(1)
    admin = {"authorization": f"Bearer {os.environ['GATEWAY_ADMIN_KEY']}"}
    created = httpx.post(f"{args.url}/admin/keys", headers=admin, timeout=10,
                         json={"name": "make-run", "expires_in": "1d", "metadata": {"created_by": "make run"}})
    created.raise_for_status()
    key = created.json()["key"]
    body = ('{"model":"%s","messages":[{"role":"user","content":"Write a haiku about GPUs."}],"max_tokens":64}'
            % args.model)
    print(f"""
Gateway ready at {args.url}/v1 (Ctrl-C stops it and its backends).
A key for you, valid for a day: {key}

  curl {args.url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}'
""", flush=True)


if __name__ == "__main__":
    main()
