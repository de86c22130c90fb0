"""The one OpenAI shape every runtime's answer is rebuilt into.

A client must not be able to tell which runtime answered (only `owned_by` in /v1/models says
it), so the runtime adapters do not pass their answers through: they rebuild them from the
fields OpenAI defines and drop the rest (llama.cpp's `timings`, vLLM's `stop_reason`,
`token_ids`, `kv_transfer_params`, ...). The rules, for every runtime alike:

- usage is exactly `{prompt_tokens, completion_tokens, total_tokens}` as ints (embeddings:
  `{prompt_tokens, total_tokens}`); runtime-specific details are dropped;
- reasoning text is `reasoning_content` (vLLM's newer `reasoning` is renamed);
- a message or delta carries `tool_calls` only when there are some; content next to tool calls
  is null, never "";
- the first delta of a chat stream is `{"role": "assistant", "content": ""}`;
- `system_fingerprint` is null (llama.cpp's build tag would name the runtime);
- ids start `chatcmpl-` for chat and `cmpl-` for text completions;
- a whole (not streamed) answer without its `choices` list (embeddings: `data`) is no answer: a 502.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.errors import UpstreamError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: Any, completion_tokens: Any) -> dict[str, int]:
    prompt, completion = token_count(prompt_tokens), token_count(completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def clean_usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    return usage(raw.get("prompt_tokens"), raw.get("completion_tokens"))


MAX_COUNTED = 2**31 - 1  # no request's token count is larger; what is, is garbage


def token_count(value: Any) -> int:
    """A runtime's token count as a count: anything but a number from 0 to MAX_COUNTED is 0.
    These go into usage totals and the limiter, where one "ten" or 1e30 must not break either."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_COUNTED:
        return 0  # (a NaN fails the comparison too)
    return int(value)


def _reasoning(source: dict[str, Any]) -> Any:
    value = source.get("reasoning_content")
    return value if value is not None else source.get("reasoning")


def message(raw: Any) -> dict[str, Any]:
    raw = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {"role": "assistant", "content": raw.get("content")}
    tool_calls = raw.get("tool_calls")
    if tool_calls:
        out["tool_calls"] = tool_calls
        if out["content"] == "":
            out["content"] = None
    reasoning = _reasoning(raw)
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def delta(raw: Any) -> dict[str, Any]:
    raw = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {}
    if "role" in raw:
        out["role"] = raw["role"]
        out["content"] = raw.get("content") or ""
    elif raw.get("content") is not None:
        out["content"] = raw["content"]
    reasoning = _reasoning(raw)
    if reasoning:
        out["reasoning_content"] = reasoning
    if raw.get("tool_calls"):
        out["tool_calls"] = raw["tool_calls"]
    return out


def _base(data: dict[str, Any], obj: str, id_prefix: str) -> dict[str, Any]:
    created = data.get("created")
    found = data.get("id")
    if isinstance(found, str) and id_prefix == "cmpl" and found.startswith("chatcmpl-"):
        found = "cmpl-" + found[len("chatcmpl-"):]  # llama.cpp names text completions like chats
    return {
        "id": found if isinstance(found, str) else new_id(id_prefix),
        "object": obj,
        "created": created if isinstance(created, int) else int(time.time()),
        "model": data.get("model") or "",
        "system_fingerprint": None,
    }


def chat_completion(data: dict[str, Any]) -> dict[str, Any]:
    out = _base(data, "chat.completion", "chatcmpl")
    out["choices"] = [
        {"index": c.get("index", i), "message": message(c.get("message")), "logprobs": c.get("logprobs"),
         "finish_reason": c.get("finish_reason")}
        for i, c in enumerate(_choices(data))
    ]
    out["usage"] = clean_usage(data.get("usage")) or usage(0, 0)
    return out


def text_completion(data: dict[str, Any]) -> dict[str, Any]:
    out = _base(data, "text_completion", "cmpl")
    out["choices"] = [
        {"index": c.get("index", i), "text": c.get("text") or "", "logprobs": c.get("logprobs"),
         "finish_reason": c.get("finish_reason")}
        for i, c in enumerate(_choices(data))
    ]
    out["usage"] = clean_usage(data.get("usage")) or usage(0, 0)
    return out


def chunk(endpoint: str, data: dict[str, Any]) -> dict[str, Any]:
    """One stream chunk; a `usage` the runtime put on it stays (the core takes it off)."""
    if endpoint == "completions":
        out = _base(data, "text_completion", "cmpl")
        out["choices"] = [
            {"index": c.get("index", i), "text": c.get("text") or "", "logprobs": c.get("logprobs"),
             "finish_reason": c.get("finish_reason")}
            for i, c in enumerate(_choices(data))
        ]
    else:
        out = _base(data, "chat.completion.chunk", "chatcmpl")
        out["choices"] = [
            {"index": c.get("index", i), "delta": delta(c.get("delta")), "logprobs": c.get("logprobs"),
             "finish_reason": c.get("finish_reason")}
            for i, c in enumerate(_choices(data))
        ]
    found = clean_usage(data.get("usage"))
    if found is not None:
        out["usage"] = found
    return out


def split_finish(endpoint: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """A chunk that carries both the last token and `finish_reason` (vLLM) -> the token chunk,
    then a finish chunk with an empty delta (llama.cpp and OpenAI send them apart)."""
    choices = _choices(data)
    if len(choices) != 1 or not choices[0].get("finish_reason"):
        return [data]
    choice = choices[0]
    has_token = bool(choice.get("text")) if endpoint == "completions" else bool(delta(choice.get("delta")))
    if not has_token:
        return [data]
    token = {**data, "choices": [{**choice, "finish_reason": None}]}
    token.pop("usage", None)
    empty: dict[str, Any] = {"text": ""} if endpoint == "completions" else {"delta": {}}
    finish = {**data, "choices": [{**{k: v for k, v in choice.items() if k not in ("text", "delta")}, **empty}]}
    if "logprobs" in choice:
        finish["choices"][0]["logprobs"] = None  # the token's, already on the token chunk: not twice
    return [token, finish]


def embeddings(data: dict[str, Any]) -> dict[str, Any]:
    items = data.get("data") if isinstance(data.get("data"), list) else []
    raw_usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt = token_count(raw_usage.get("prompt_tokens"))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": item.get("index", i), "embedding": item.get("embedding")}
                 for i, item in enumerate(items) if isinstance(item, dict)],
        "model": data.get("model") or "",
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    choices = data.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


# What a whole (not streamed) answer of each endpoint must hold, and the object it then is.
ANSWER_LISTS = {"chat": ("choices", "chat.completion"), "completions": ("choices", "text_completion"),
                "embeddings": ("data", "embeddings list")}


def openai_answer(endpoint: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if it is the endpoint's OpenAI object, else a 502. Unchecked, any JSON object answered
    with a 200 (`{"status": "ok"}` from a backend `url` that points at something else) would reach
    the client as a success with no choices and no usage, and be counted as one."""
    field, name = ANSWER_LISTS[endpoint]
    if not isinstance(data.get(field), list):
        raise UpstreamError(502, f"The backend's answer is not an OpenAI {name} object: it has no `{field}` list.")
    return data


def canonical(endpoint: str, data: dict[str, Any]) -> dict[str, Any]:
    """A runtime's OpenAI answer, rebuilt in the one shape (a 502 if it is not one)."""
    openai_answer(endpoint, data)
    if endpoint == "chat":
        return chat_completion(data)
    if endpoint == "completions":
        return text_completion(data)
    return embeddings(data)
