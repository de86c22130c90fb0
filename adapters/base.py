"""The narrow interface between the gateway and one kind of runtime.

An adapter answers these questions and does no I/O of its own:
  - how to launch the runtime (command line and environment, GPU selection) for a managed
    backend, and which one-shot commands to run around it (a version probe; `ollama pull`);
  - what a health probe's answer means (loading, ready, or broken), for readiness and liveness;
  - where the runtime reports its load, and what that report says (running, waiting requests);
  - how an OpenAI request becomes the runtime's request;
  - how the runtime's reply, error or stream becomes OpenAI objects.
The default implementation is passthrough for runtimes that already speak the OpenAI API; a
runtime overrides only where it differs. The gateway core never branches on the runtime.
"""

from __future__ import annotations

import enum
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from gateway.errors import UpstreamError
from gateway.openai import PATHS, Endpoint

if TYPE_CHECKING:
    from gateway.config import BackendConfig

_decode = msgspec.json.decode


class ChunkProbe(msgspec.Struct):
    """The fields of a stream chunk that decide whether the client may get it as it came
    (SSEDecoder.hand_on). Decoding only these skips over the rest without building objects."""

    model: Any = msgspec.UNSET
    choices: list[msgspec.Raw] | None = None
    usage: Any = msgspec.UNSET
    error: Any = msgspec.UNSET


_probe = msgspec.json.Decoder(ChunkProbe).decode
_UNSET = msgspec.UNSET


def find_binary(configured: str | list[str] | None, name: str) -> list[str]:
    """The backend's `binary` (a path, or an argv prefix such as [python, script]), else `name` on PATH."""
    if configured:
        return [configured] if isinstance(configured, str) else list(configured)
    on_path = shutil.which(name)
    if on_path is None:
        raise FileNotFoundError(f"{name} not found: set the backend's `binary`, or put {name} on PATH")
    return [on_path]


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Health(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # alive, not serving yet (model still loading)
    BROKEN = "broken"  # alive but reports it cannot serve


@dataclass(frozen=True)
class UpstreamRequest:
    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Load:
    """What a runtime says about its own load, under one set of names for every runtime."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage_ratio: float | None = None


class Adapter:
    runtime: ClassVar[str] = "openai"
    owned_by: ClassVar[str] = "openai"
    health_path: ClassVar[str] = "/health"
    # Where the runtime reports its load (None: it does not; the gateway's own count is used).
    load_path: ClassVar[str | None] = None
    # Where the runtime lists the models it has (None: it serves what it was started with).
    models_path: ClassVar[str | None] = None
    # Body fields of the runtime's own that cap the completion as max_tokens does: the limiter's
    # estimate must count them, or a client could reserve 1 token and generate thousands.
    length_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backend: BackendConfig | None = None) -> None:
        # One adapter per backend: request translation may depend on its config (Ollama's num_ctx).
        self.backend = backend

    # --- managed processes ----------------------------------------------------------------

    def launch(self, backend: BackendConfig, port: int) -> Launch:
        raise NotImplementedError(f"runtime {self.runtime!r} cannot be spawned; give the backend a `url`")

    def version_command(self, backend: BackendConfig) -> Launch | None:
        """A one-shot command whose output says which runtime build runs (kept in the backend's log)."""
        return None

    def setup_commands(self, backend: BackendConfig, base_url: str) -> list[Launch]:
        """One-shot commands to run once the server is ready (e.g. pulling missing models)."""
        return []

    def gpu_env(self, backend: BackendConfig) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": backend.gpus} if backend.gpus is not None else {}

    def load(self, status: int, body: bytes) -> Load | None:
        """Parse the answer from `load_path`; None when it says nothing usable."""
        return None

    def missing_models(self, backend: BackendConfig, status: int, body: bytes) -> list[str]:
        """Parse the answer from `models_path`: which of the backend's `serves` it does not have.
        Here OpenAI's list (`{"data": [{"id": ...}]}`); an answer that is not one tells nothing."""
        if status != 200:
            return []
        try:
            data = _decode(body)
        except (msgspec.DecodeError, RecursionError):
            return []
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            return []
        ids = {m.get("id") for m in listed if isinstance(m, dict)}
        return [name for name in backend.serves if name not in ids]

    def health(self, status: int, body: bytes) -> Health:
        if status == 200:
            return Health.READY
        if status == 503:
            return Health.LOADING
        return Health.BROKEN

    # --- requests --------------------------------------------------------------------------

    def request(self, endpoint: Endpoint, body: dict[str, Any], upstream_model: str) -> UpstreamRequest:
        body = {**body, "model": upstream_model}  # the caller's dict stays as the client sent it
        if endpoint == "embeddings":
            # Embeddings never stream: OpenAI's API has no `stream` there, and the gateway answers
            # them with one JSON object whatever the client sent. vLLM would log both fields as
            # ignored, llama-server does not read them, and a stricter OpenAI-compatible server
            # could refuse them: ask every runtime for exactly the one answer the gateway reads.
            body.pop("stream", None)
            body.pop("stream_options", None)
        elif body.get("stream"):
            # Always ask for usage, so accounting never depends on the client; the gateway
            # drops it again for clients that did not ask.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        else:
            # vLLM refuses stream_options without stream (400), llama.cpp ignores it: drop it so
            # the answer does not depend on the runtime.
            body.pop("stream_options", None)
        return UpstreamRequest(PATHS[endpoint], body)

    def response(self, endpoint: Endpoint, body: bytes, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """The runtime's reply -> the OpenAI object; `request` is the client's body, as decoded.

        Here only decoded, and an error it carries raised: whether it is the OpenAI object asked for
        is the subclass's to check (shapes.openai_answer), since a runtime with its own API (Ollama)
        builds on this with answers of its own shape."""
        try:
            data = _decode(body)
        except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
            raise UpstreamError(502, "The backend returned a response that is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamError(502, "The backend returned a response that is not a JSON object.")
        if "error" in data and "choices" not in data and "data" not in data:
            raise self.error(502, body)
        return data

    def decoder(self, endpoint: Endpoint) -> StreamDecoder:
        """A decoder for one stream of this runtime. Passthrough: server-sent events whose data is
        already an OpenAI chunk; a runtime that reshapes chunks passes its own `shape`."""
        return SSEDecoder(self.error)

    async def stream(self, endpoint: Endpoint, data: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
        """The runtime's stream -> OpenAI chunk objects, one by one; raises UpstreamError on an
        error event (after the chunks before it). The gateway's relay feeds `decoder()` itself,
        a whole read at a time; this is the same decoding for callers that want single chunks."""
        decoder, pieces = self.decoder(endpoint), aiter(data)
        while not decoder.finished:
            piece = await anext(pieces, None)
            out: list[dict[str, Any]] = []
            try:
                if piece is None:
                    decoder.end(out)  # raises unless the stream ended properly
                else:
                    decoder.feed(piece, out)
            finally:
                for chunk in out:
                    yield chunk

    def error(self, status: int | None, body: bytes) -> UpstreamError:
        """Any error body the runtime may send -> an OpenAI-shaped error keeping the status.

        `status` is None for an error inside a stream (sent with HTTP 200): the body's own
        numeric code, where it has one, says what kind of failure it was.
        """
        in_stream = status is None
        status = status or 500
        if status in (401, 403):
            # The gateway's own key for the backend was refused: the client's key was fine, so
            # an auth error would send it looking in the wrong place.
            return UpstreamError(502, "The backend for this model refused the gateway's credentials.",
                                 code="upstream_auth_failed")
        try:
            data: Any = _decode(body)
        except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
            text = body.decode("utf-8", "replace").strip()[:500]
            return UpstreamError(status, text or f"The backend answered with status {status}.")
        if isinstance(data, dict):
            inner = data.get("error", data)
            if isinstance(inner, str):
                return UpstreamError(status, inner)
            if isinstance(inner, dict):
                message = str(inner.get("message") or inner.get("detail") or f"The backend answered with status {status}.")
                code = inner.get("code")
                if type(code) is int and 400 <= code < 600:
                    # llama.cpp and vLLM put the HTTP status here, not an OpenAI code.
                    if in_stream:
                        status = code
                    code = None
                err_type = inner.get("type")
                return UpstreamError(status, message, type=_normal_type(err_type, status),
                                     code=_nullable_string(code), param=_nullable_string(inner.get("param")))
        return UpstreamError(status, f"The backend answered with status {status}.")


def _normal_type(value: Any, status: int) -> str | None:
    """Runtimes name error types their own way (`NotFoundError`, `unavailable_error`); clients
    branch on the OpenAI names, so keep only those and derive the rest from the status."""
    known = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
             "rate_limit_error", "server_error"}
    return value if isinstance(value, str) and value in known else None


def _nullable_string(value: Any) -> str | None:
    """`param` and `code` are nullable strings in the OpenAI error; runtimes also send numbers
    (kept, as text) and objects or lists (dropped: no client could branch on them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


ErrorMapper = Callable[[int | None, bytes], UpstreamError]  # Adapter.error: (status or None in a stream, body)


class StreamDecoder:
    """One runtime stream, fed as its bytes arrive (split anywhere), -> OpenAI chunk objects.

    No I/O and no awaiting: the relay reads whatever the socket has, feeds it here and writes
    the chunks that came out as one piece, so a burst of tokens costs one write, not one each.
    Chunks go into `out` as they are decoded, so the ones before an error event still reach the
    client when `feed` raises it.
    """

    unit = "line"  # what the runtime's stream is made of, for the errors about one

    def __init__(self) -> None:
        self._partial = b""
        self.finished = False
        self.handed_on = 0  # events put into `out` as the runtime wrote them (hand_on), so far

    def hand_on(self, model: str, usage_null: bool) -> None:
        """Chunks that need no change may go into `out` as the SSE events the client gets, in
        bytes (see SSEDecoder's); a decoder that reshapes every chunk ignores this."""

    def feed(self, data: bytes, out: list[dict[str, Any]]) -> None:
        lines = (self._partial + data).split(b"\n") if self._partial else data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended with a newline
        for raw in lines:
            if self.finished:
                return  # whatever follows the end is not part of this answer
            line = raw.strip()
            if line:
                self.line(line, out)

    def end(self, out: list[dict[str, Any]]) -> None:
        """The runtime closed the stream: a last unterminated line counts; no end marker is an error."""
        line = self._partial.strip()
        self._partial = b""
        if line and not self.finished:
            self.line(line, out)
        if not self.finished:
            # Every runtime ends a whole stream with its end marker: without it the answer was cut
            # off (the runtime died), and the client must be told rather than handed half a reply.
            raise UpstreamError(502, "The backend closed the stream before it finished.")

    def line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def json_object(self, payload: bytes) -> dict[str, Any]:
        try:
            value = _decode(payload)
        except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
            raise UpstreamError(502, f"The backend sent a stream {self.unit} that is not JSON.") from None
        if not isinstance(value, dict):
            raise UpstreamError(502, f"The backend sent a stream {self.unit} that is not a JSON object.")
        return value


class SSEDecoder(StreamDecoder):
    """Server-sent events whose data is an OpenAI chunk, ended by `data: [DONE]`.

    `shape` turns one chunk of the runtime into the chunks the client gets (none: as they are).
    """

    unit = "event"

    def __init__(self, error: ErrorMapper, shape: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> None:
        super().__init__()
        self._error, self._shape = error, shape
        self._as_is: tuple[str, bool] | None = None
        self._model_choices = b""

    def hand_on(self, model: str, usage_null: bool) -> None:
        """Put a chunk that needs no change into `out` as the runtime wrote it, a whole SSE event
        in bytes, instead of decoding it to an object the relay would encode again (12 us instead
        of 28 for a 22-event stream: bench/README.md). It needs none when it names `model`, carries
        no usage (`"usage": null` when `usage_null`, the client having asked for usage; else
        none at all) and has choices. Only a runtime whose chunks are OpenAI's already (no `shape`)."""
        if self._shape is None:
            self._as_is = (model, usage_null)
            self._model_choices = b'"model":' + msgspec.json.encode(model) + b',"choices":[{'  # (_run)

    def feed(self, data: bytes, out: list[Any]) -> None:
        # The loop every OpenAI-speaking stream runs once per token, kept to the fewest Python
        # steps a line (bench/README.md): a run of token events is handed on whole (_run); the
        # common `data: {json}` line is handled here, without a method call; every other line
        # (`[DONE]`, comments, fields, other spacing) takes the general path, `line`.
        if self._partial:
            data = self._partial + data
        if self._as_is is not None and not self.finished:
            data = self._run(data, out)
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended with a newline
        shape, as_is = self._shape, self._as_is
        model, usage_null = as_is if as_is is not None else ("", False)
        for raw in lines:
            if not raw:
                continue  # the blank line that ends each event
            if self.finished:
                return  # whatever follows the end is not part of this answer
            if raw[:7] != b"data: {":  # (a slice costs less than startswith's argument parsing)
                line = raw.strip()
                if line:
                    self.line(line, out)
                continue
            if as_is is not None:
                # Handed on as it came (hand_on) if it names the model, has choices and no error,
                # and carries usage only as the null the client asked for.
                try:
                    probe = _probe(raw[6:])
                except (msgspec.DecodeError, RecursionError):
                    probe = None  # the full decoding below says what is wrong with it
                if (probe is not None and probe.model == model and probe.error is _UNSET and probe.choices
                        and raw[-1] == 125):  # "}"
                    usage = probe.usage
                    if usage is _UNSET:
                        if not usage_null:
                            out.append(raw + b"\n\n")
                            self.handed_on += 1
                            continue
                    elif usage is None:
                        if usage_null:
                            out.append(raw + b"\n\n")
                            self.handed_on += 1
                            continue
                        # OpenAI and vLLM write `usage` last; a client that did not ask gets none.
                        if raw[-14:] == b',"usage":null}':
                            out.append(raw[:-14] + b"}\n\n")
                            self.handed_on += 1
                            continue
            try:
                chunk = _decode(raw[6:])  # surrounding whitespace (a `\r`) is JSON whitespace
            except (msgspec.DecodeError, RecursionError):  # (nested past the stack)
                raise UpstreamError(502, "The backend sent a stream event that is not JSON.") from None
            if type(chunk) is not dict:
                raise UpstreamError(502, "The backend sent a stream event that is not a JSON object.")
            if "error" in chunk:
                raise self._error(None, raw[6:].strip())
            if shape is None:
                out.append(chunk)
            else:
                out.extend(shape(chunk))

    def _run(self, data: bytes, out: list[Any]) -> bytes:
        """The token events `data` begins with, handed on as one piece if all of them may reach
        the client as written (hand_on); the rest of `data` is for the loop in `feed`.

        What hand_on asks of each event is checked for the whole run with a few byte counts (C
        loops) instead of a probe and a dozen Python steps per event: bench/README.md has the
        instructions this saves. The run ends before the first usage object (the usage chunk,
        which the relay takes out) or, without one, the end marker. Then, in it: no `"error":`
        key; in each event the model's name followed by a non-empty `choices` list (the key
        order OpenAI and vLLM write); every event's last key `usage`, null. A count over the
        run can say so, because a key is only ever a key: inside a JSON string every quote is
        escaped. Events are counted by their boundaries, so a line that is not a `data: {...}`
        event (a comment, a field, an unusual spacing) leaves a model's name without its event
        and fails the count. A run that does not add up goes to the loop whole, which decides
        event by event: a miss costs time, never a wrong answer. The events' JSON is not
        parsed: a runtime that speaks OpenAI wrote it, and its client reads it."""
        end = data.rfind(b"\n\n") + 2  # (1 when there is no whole event)
        at = data.find(b'"usage":{', 0, end)
        if at < 0:
            at = data.find(b"data: [DONE]", 0, end)
        if at >= 0:
            end = data.rfind(b"\n\n", 0, at) + 2
        if end < 2:
            return data
        run = data[:end]
        events = run.count(b"}\n\ndata: {") + 1
        if not (run.startswith(b"data: {") and run.endswith(b"}\n\n") and run.count(self._model_choices) == events
                and run.count(b',"usage":null}\n\n') == events and b'"error":' not in run):
            return data
        if not self._as_is[1]:  # (usage_null) a client that did not ask gets no usage field at all
            run = run.replace(b',"usage":null}\n\n', b"}\n\n")
        out.append(run)
        self.handed_on += events
        return data[end:]

    def line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.finished = True
                return
            if payload == b"null":
                return  # llama-server opens a streamed completion of a prompt list with one: no chunk
            chunk = self.json_object(payload)
            if "error" in chunk:
                raise self._error(None, payload)
            if self._shape is None:
                out.append(chunk)
            else:
                out.extend(self._shape(chunk))
        elif line.startswith(b"error:"):
            # Older llama.cpp builds: a non-standard `error: {json}` line, then [DONE].
            raise self._error(None, line[6:].strip())
        # Comments (`: ping`), `event:`/`id:`/`retry:` fields carry nothing the client needs.
