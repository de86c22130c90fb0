"""`gateway keys ...`: the admin API from a terminal. The admin key comes from the environment
(GATEWAY_ADMIN_KEY), never from the command line, where `ps` and shell history would show it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

COLUMNS = ("id", "name", "status", "prefix", "models", "rpm", "tpm", "max_concurrency", "expires_at", "last_used_at")
SHOWN_OF_A_STRANGE_ANSWER = 160  # characters of an answer that is not the admin API's, in the one error line


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="issue and manage API keys through a running gateway's admin API")
    keys.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                      help="the gateway's base URL (or GATEWAY_URL)")
    keys.add_argument("--json", action="store_true", help="print the JSON the admin API returned")
    verbs = keys.add_subparsers(dest="verb", required=True)

    def limits(p: argparse.ArgumentParser) -> None:
        models = p.add_mutually_exclusive_group()
        models.add_argument("--models", type=_model_list,
                            help="comma-separated model names the key may use (default: all, see --all-models)")
        models.add_argument("--all-models", action="store_true",
                            help="the key may use every model (on update: lifts a --models list)")
        p.add_argument("--rpm", type=int)
        p.add_argument("--tpm", type=int)
        p.add_argument("--max-concurrency", type=int)
        p.add_argument("--priority", type=int)
        p.add_argument("--expires-in", help="e.g. 3600, 12h, 30d")
        p.add_argument("--expires-at", help="RFC 3339 time, e.g. 2027-01-01T00:00:00Z (UTC when it has no offset)")
        p.add_argument("--metadata", help="a JSON object")

    create = verbs.add_parser("create", help="issue a key (the secret is shown once)")
    create.add_argument("--name", required=True)
    limits(create)
    listing = verbs.add_parser("list", help="list keys")
    listing.add_argument("--status", default="active", choices=["active", "revoked", "expired", "all"])
    listing.add_argument("--name")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    show = verbs.add_parser("show", help="show one key")
    show.add_argument("id")
    update = verbs.add_parser("update", help="change a key's name, models or limits")
    update.add_argument("id")
    update.add_argument("--name")
    limits(update)
    revoke = verbs.add_parser("revoke", help="revoke a key (takes effect on every replica within a second)")
    revoke.add_argument("id")
    rotate = verbs.add_parser("rotate", help="new secret, same id and settings")
    rotate.add_argument("id")
    rotate.add_argument("--grace-period", default="0", help="how long the old secret keeps working, e.g. 1h")
    keys.set_defaults(func=run)


def _model_list(value: str) -> list[str]:
    """--models as the admin API's list. One that names no model (`--models ""`) is refused: the
    API would store `[]`, a key that may use no model at all, which no one asking for it means."""
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("names no model; leave --models out for all models "
                                         "(or give --all-models, which on update lifts a list)")
    return models


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(args, "name", None) is not None:
        fields["name"] = args.name
    if args.models is not None:
        fields["models"] = args.models
    elif args.all_models:
        fields["models"] = None  # the admin API's "every model"
    for name in ("rpm", "tpm", "max_concurrency", "priority", "expires_in", "expires_at"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.metadata is not None:
        try:
            fields["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --metadata is not JSON: {exc}") from None
    return fields


def run(args: argparse.Namespace) -> None:
    admin_key = os.environ.get("GATEWAY_ADMIN_KEY")
    if not admin_key:
        print("error: set GATEWAY_ADMIN_KEY to the gateway's admin key", file=sys.stderr)
        raise SystemExit(2)
    client = httpx.Client(base_url=args.url.rstrip("/"), headers={"authorization": f"Bearer {admin_key}"},
                          timeout=30)
    verb = args.verb
    try:
        if verb == "create":
            response = client.post("/admin/keys", json=_fields(args))
        elif verb == "list":
            params = {"status": args.status, "limit": args.limit, "offset": args.offset}
            if args.name:
                params["name"] = args.name
            response = client.get("/admin/keys", params=params)
        elif verb == "show":
            response = client.get(f"/admin/keys/{args.id}")
        elif verb == "update":
            response = client.patch(f"/admin/keys/{args.id}", json=_fields(args))
        elif verb == "revoke":
            response = client.delete(f"/admin/keys/{args.id}")
        else:
            response = client.post(f"/admin/keys/{args.id}/rotate", json={"grace_period": args.grace_period})
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    data = _admin_answer(response, verb)
    if args.json:
        print(json.dumps(data, indent=2))
    elif verb == "list":
        _table(data["data"])
        print(f"({len(data['data'])} of {data['total']})")
    else:
        _table([data])
        if "key" in data:
            print(f"\nkey: {data['key']}\nStore it now: it is shown this once and never again.")


def _admin_answer(response: httpx.Response, verb: str) -> dict[str, Any]:
    """The admin API's answer; its error, or anything else (what a proxy or another server sent: an
    HTML error page, a 404 of `python -m http.server`), is one line on stderr and exit status 1."""
    try:
        data = response.json() if response.content else {}
    except ValueError:  # not JSON, or not even text
        data = None
    message = _error_message(data)
    if response.status_code >= 400 and message is not None:
        print(f"error: {response.status_code}: {message}", file=sys.stderr)
        raise SystemExit(1)
    if response.status_code >= 400 or not isinstance(data, dict) or not _is_admin_answer(data, verb):
        print(f"error: {response.status_code} from {response.request.url}, not an answer of the gateway's admin API "
              f"(is --url the gateway, and is it up?): {_shortened(response.text)}", file=sys.stderr)
        raise SystemExit(1)
    return data


def _is_admin_answer(data: dict[str, Any], verb: str) -> bool:
    """Enough of the admin API's shape for what is printed of it: for `list` a page of keys."""
    return verb != "list" or (isinstance(data.get("data"), list) and isinstance(data.get("total"), int))


def _error_message(data: Any) -> str | None:
    """The message of an OpenAI-format error, as the admin API answers its errors; else None."""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def _shortened(text: str) -> str:
    """An answer as part of one line: a whole HTML page would bury the status."""
    text = " ".join(text.split())
    if not text:
        return "(an empty answer)"
    return text if len(text) <= SHOWN_OF_A_STRANGE_ANSWER else text[:SHOWN_OF_A_STRANGE_ANSWER - 3] + "..."


def _table(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            # Distinct from "-" (models: every model): a key stored with `models: []` may use none.
            return ",".join(map(str, value)) if value else "(none)"
        return str(value)

    cells = [[cell(row.get(c)) for c in COLUMNS] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
