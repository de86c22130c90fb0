"""Deterministic fake "model" output shared by the fake runtimes.

One token is one whitespace-separated word: `count_tokens` is what the fakes report as
prompt token counts, and every generated piece (a word, with its leading space) counts as
one completion token.  Output depends only on (prompt, seed), so tests can predict it by
calling these functions themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

VOCAB = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
    "zulu amber basil cedar dune ember fjord granite harbor iris jasper kelp lagoon "
    "meadow nectar orchid pebble quartz river saffron thistle umber valley willow "
    "yarrow zephyr"
).split()


def _hash_int(*parts: object) -> int:
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def count_tokens(text: str) -> int:
    """Token count of a prompt: the number of whitespace-separated words."""
    return len(text.split())


def token_ids(text: str) -> list[int]:
    """Fake token ids, one per word (stable across runs)."""
    return [_hash_int("tok", word) % 50000 for word in text.split()]


def words(prompt: str, seed: int, count: int, salt: str = "w") -> list[str]:
    """`count` vocabulary words chosen by hashing prompt, seed and position."""
    return [VOCAB[_hash_int(salt, prompt, seed, i) % len(VOCAB)] for i in range(count)]


def natural_length(prompt: str, seed: int) -> int:
    """How many words the fake model says before it "decides" to stop (5..16).

    FAKE_OUTPUT_WORDS overrides it (for tests that need long streams)."""
    fixed = os.environ.get("FAKE_OUTPUT_WORDS")
    if fixed:
        return max(1, int(fixed))
    return 5 + _hash_int("len", prompt, seed) % 12


def pieces_from_words(ws: list[str]) -> list[str]:
    """Streaming pieces: 'alpha', ' bravo', ' charlie.'"""
    return [w if i == 0 else " " + w for i, w in enumerate(ws)]


def split_pieces(text: str) -> list[str]:
    """Split arbitrary text (e.g. JSON) into pieces whose concatenation is the text."""
    return re.findall(r"\s*\S+", text) or [text]


@dataclass
class Generation:
    pieces: list[str] = field(default_factory=list)  # what the client sees, in order
    tokens: int = 0  # completion tokens generated (includes a token eaten by a stop string)
    finish_reason: str = "stop"  # "stop" or "length"
    stop_reason: str | None = None  # the stop string that ended the output, if any

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def limit(pieces: list[str], max_tokens: int | None, stops: list[str]) -> Generation:
    """Apply max_tokens and stop strings to a planned sequence of pieces.

    A stop string is cut out together with everything after it (finish "stop",
    stop_reason = that string); running out of max_tokens gives finish "length"."""
    out: list[str] = []
    text = ""
    for n, piece in enumerate(pieces):
        if max_tokens is not None and n >= max_tokens:
            return Generation(out, n, "length", None)
        if stops:  # (the text so far is kept only for them: building it is quadratic in long answers)
            candidate = text + piece
            hits = [(candidate.find(s), s) for s in stops if s and s in candidate]
            if hits:
                cut, stop = min(hits)
                return Generation(_cut_pieces(out + [piece], cut), n + 1, "stop", stop)
            text = candidate
        out.append(piece)
    return Generation(out, len(pieces), "stop", None)


def _cut_pieces(pieces: list[str], cut: int) -> list[str]:
    """Keep only the first `cut` characters of the concatenated pieces."""
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) <= cut:
            kept.append(piece)
            used += len(piece)
        else:
            if cut - used > 0:
                kept.append(piece[: cut - used])
            break
    return kept


def generate(prompt: str, seed: int, max_tokens: int | None, stops: list[str]) -> Generation:
    """Plain-text completion of `prompt`."""
    ws = words(prompt, seed, natural_length(prompt, seed))
    ws[-1] += "."
    return limit(pieces_from_words(ws), max_tokens, stops)


def reasoning_pieces(prompt: str, seed: int) -> list[str]:
    """A short fake chain of thought (for reasoning/thinking fields)."""
    return pieces_from_words(["Thinking", "about"] + words(prompt, seed, 4, salt="r"))


def value_for_schema(schema: object, prompt: str, seed: int, path: str = "") -> object:
    """A JSON value that satisfies simple JSON schemas (type/properties/items/enum)."""
    if not isinstance(schema, dict):
        schema = {}
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind is None and "properties" in schema:
        kind = "object"
    h = _hash_int("v", prompt, seed, path)
    if kind == "object":
        props = schema.get("properties") or {}
        if not props:
            return {"answer": " ".join(words(prompt, seed, 3, salt=path))}
        return {
            name: value_for_schema(sub, prompt, seed, f"{path}.{name}")
            for name, sub in props.items()
        }
    if kind == "array":
        return [value_for_schema(schema.get("items"), prompt, seed, path + "[0]")]
    if kind == "integer":
        return h % 100
    if kind == "number":
        return round((h % 10000) / 100, 2)
    if kind == "boolean":
        return bool(h % 2)
    if kind == "null":
        return None
    return " ".join(words(prompt, seed, 2, salt=path))


def json_text(schema: object, prompt: str, seed: int) -> str:
    """JSON object text for structured output; no schema gives {"answer": "..."}."""
    if not isinstance(schema, dict) or not schema:
        schema = {"type": "object"}
    value = value_for_schema(schema, prompt, seed)
    if not isinstance(value, dict):
        value = {"answer": value}
    return json.dumps(value)


def tool_arguments(schema: object, prompt: str, seed: int) -> dict:
    """Arguments object for a tool call: one value per declared parameter ({} if none)."""
    if not isinstance(schema, dict) or not schema.get("properties"):
        return {}
    return value_for_schema(schema, prompt, seed)


def embedding(text: str, dim: int = 8) -> list[float]:
    """Unit-length vector derived from the text."""
    raw = [((_hash_int("e", text, i) % 20001) - 10000) / 10000 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
