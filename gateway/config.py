"""Typed configuration, validated once at start-up.

`load(path)` is the only place that reads YAML or the environment. It returns a frozen `Config`
or raises `ConfigError` listing every problem as `path.to.field: reason`, so an operator fixes a
broken file in one go instead of one error per restart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

Runtime = Literal["llamacpp", "vllm", "ollama", "openai"]


class ConfigError(Exception):
    """The config file cannot be used; `problems` holds one `path: reason` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value parsers -------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def _seconds(value: Any) -> Any:
    """`30`, `1.5`, `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"400d"` -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '30s', '5m' or '250ms'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError("expected a duration such as 30, '30s', '5m' or '250ms'")


def _bytes(value: Any) -> Any:
    """`1048576`, `"16MiB"`, `"512KB"` -> bytes as int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    raise ValueError("expected a size such as 1048576, '16MiB' or '512KB'")


def _token(value: str) -> str:
    # Sent as `Authorization: Bearer <api_key>`: one token, nothing that could end the header.
    # (The value is a secret: the message does not show it.)
    if not re.fullmatch(r"[\x21-\x7e]+", value):
        raise ValueError("must be one token of printable ASCII characters (no spaces or line breaks)")
    return value


def _matching(pattern: str, what: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            # The message reaches stderr and /admin/reload's answer: a URL's user:password is not shown.
            raise ValueError(f"{without_password(value)!r} is not {what}")
        return value

    return AfterValidator(check)


_USERINFO = re.compile(r"//[^/@\s]*@")


def without_password(url: str) -> str:
    """A URL as errors and logs show it: its user:password masked."""
    return _USERINFO.sub("//***@", url)


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0)]
Bytes = Annotated[int, BeforeValidator(_bytes), Field(gt=0)]
Name = Annotated[str, Field(max_length=200), _matching(
    r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]*$", "a model name (letters, digits and . _ : / @ -, starting with a letter or digit)")]
BackendName = Annotated[str, Field(max_length=64), _matching(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", "a backend name (letters, digits and . _ -, starting with a letter or digit)")]
def _base_url(value: str) -> str:
    """A backend's base URL, to which the gateway appends the runtime's paths (/v1/..., /api/...)."""
    shown = without_password(value)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not a usable URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", value):
        raise ValueError(f"{shown!r} is not an http:// or https:// URL")
    if port == 0:
        raise ValueError(f"{shown!r}: port 0 is not a port a server listens on")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: a base URL takes no query or fragment (the gateway appends the paths)")
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{shown!r}: leave out the trailing /v1, the gateway appends /v1/... itself "
                         f"(an OpenAI SDK's base_url has it; a backend's url does not)")
    return value


Url = Annotated[str, AfterValidator(_base_url)]
Origin = Annotated[str, Field(max_length=256), _matching(
    r"^(\*|https?://[^\s/]+)$", "`*` or an origin (scheme://host[:port], no path)")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ------------------------------------------------------------------------------


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body: Bytes = 16 * 1024**2
    # Bound on one upstream request, first byte to last; a generation longer than this is cut.
    request_timeout: Seconds = 600.0
    # Bound on connecting to a backend; a refused or silent backend fails over quickly.
    connect_timeout: Seconds = 5.0
    # Bound on a streamed answer's silence: a backend that sends nothing this long (before its
    # first chunk or between two) is cut, failed over if the client has nothing yet. Long enough
    # for a big prompt's prefill on CPU. A non-streamed answer is bounded by request_timeout only.
    stream_idle_timeout: Seconds = 300.0
    # Bound on a client that stops reading a stream: a write waiting this long (up to 2 s more:
    # it is looked at once a second) ends the request and frees its slot (nginx's send_timeout).
    send_timeout: Seconds = Field(default=60.0, ge=1.0)
    # Bound on a client sending its request: the head (and a new connection's first request)
    # must arrive whole within it, a body may pause no longer between reads; then 408 and the
    # connection closes (nginx's client_header_timeout and client_body_timeout; gateway/protocol.py).
    read_timeout: Seconds = Field(default=60.0, ge=1.0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Origins whose pages may call the gateway from a browser (CORS): exact origins, `*` for any,
    # or a `*` inside one (`https://*.example.com`). None by default: with keys off on loopback,
    # any web page the local user opens could otherwise use the gateway.
    cors_origins: list[Origin] = Field(default_factory=list, max_length=100)


ADMIN_KEY_MIN_LENGTH = 16


def _admin_key(value: str) -> str:
    # It opens the whole admin API (every key, all usage, reloads): a word such as "admin" is
    # guessed. Empty leaves the admin API off. (A secret: the message shows neither it nor its length.)
    if value and len(value) < ADMIN_KEY_MIN_LENGTH:
        raise ValueError(f"too short: an admin key needs at least {ADMIN_KEY_MIN_LENGTH} characters "
                         "(generate one: openssl rand -hex 32)")
    return value


class AdminConfig(_Section):
    key: Annotated[str, AfterValidator(_admin_key)] | None = None


class AuthConfig(_Section):
    # Every /v1 request needs an API key. Switching this off is for a loopback-only setup: the
    # gateway then refuses a non-loopback address unless `allow_public_without_keys` says so too.
    required: bool = True
    allow_public_without_keys: bool = False


DAY = 86400.0
# Longer than a year, so a yearly report (this year against last) still finds all of last year.
DEFAULT_USAGE_RETENTION = 400 * DAY
# A century is "keep it all" already; past it a Redis expiry time in ms would overflow.
MAX_USAGE_RETENTION = 36500 * DAY


def _usage_retention(value: float) -> float:
    # Usage is stored by the hour and reported by the day: less than a day would delete the
    # usage of the day an admin is looking at.
    if not DAY <= value <= MAX_USAGE_RETENTION:  # (NaN and infinity too)
        raise ValueError("expected a duration from '1d' to '36500d' (100 years)")
    return value


class StoreConfig(_Section):
    # None: the embedded SQLite store in data_dir. `redis://...`: shared by every replica.
    url: Annotated[str, _matching(r"^rediss?://", "a redis:// or rediss:// URL")] | None = None
    # Usage of an hour is deleted this long after the hour ends (SQLite: hourly; Redis: key expiry).
    usage_retention: Annotated[Seconds, AfterValidator(_usage_retention)] = DEFAULT_USAGE_RETENTION


class LimitValues(_Section):
    # Bounded as a key's own limits are (gateway/api/admin_keys.py): they reach Redis's Lua
    # (doubles) and every rate-limit header.
    rpm: int | None = Field(default=None, ge=1, le=2**31 - 1)
    tpm: int | None = Field(default=None, ge=1, le=2**31 - 1)
    max_concurrency: int | None = Field(default=None, ge=1, le=2**31 - 1)


class LimitsConfig(_Section):
    default: LimitValues = LimitValues()
    # Tokens reserved at admission for a request that sets no max_tokens; settled to the real
    # count when it ends.
    default_completion_tokens: int = Field(default=512, ge=1)


class QueueConfig(_Section):
    # 0: no waiting at all. A request that cannot be admitted now (a key's limit, every slot taken,
    # no backend ready) gets at once the 429 or 503 a wait would have ended in.
    max_wait: Annotated[float, BeforeValidator(_seconds), Field(ge=0)] = 30.0
    max_depth: int = Field(default=1000, ge=0)
    # Places one key may hold in the queue: without it one client (or one key blocked by its own
    # rpm) could fill every place and turn every other key away with "queue full".
    max_per_key: int = Field(default=100, ge=1)
    # Redis admission: how long a slot or queue entry lives without renewal (a replica killed
    # with SIGKILL frees its slots within this), and what to do when Redis is unreachable.
    lease_ttl: Seconds = 10.0
    redis_failure: Literal["fail_closed", "local"] = "fail_closed"
    # In `local` fallback each replica enforces limits / replicas.
    replicas: int = Field(default=1, ge=1)


class MetricsConfig(_Section):
    enabled: bool = True
    # When set, GET /metrics needs `Authorization: Bearer <token>`.
    token: str | None = None
    # Label per-key series with the key id (never the secret). Off by default: every key
    # becomes a time series.
    key_labels: bool = False


class ModelOverride(_Section):
    max_body: Bytes | None = None
    request_timeout: Seconds | None = None
    stream_idle_timeout: Seconds | None = None
    # Sampling parameters injected when the client gives none (e.g. temperature: 0.7).
    defaults: dict[str, Any] = {}


class ModelsConfig(_Section):
    # public alias -> served model name
    aliases: dict[Name, Name] = {}
    # Per served model: overrides of the server's defaults.
    overrides: dict[Name, ModelOverride] = {}


class RoutingConfig(_Section):
    # Tries per request across a model's backends when one fails before the first byte.
    max_attempts: int = Field(default=3, ge=1, le=10)
    # A backend failing `cooldown_failures` times within `cooldown_window` sits out `cooldown`.
    cooldown_failures: int = Field(default=3, ge=1)
    cooldown_window: Seconds = 60.0
    cooldown: Seconds = 30.0
    # Requests with the same value of this header go to the same backend of a group (prompt cache).
    affinity_header: str | None = "x-session-id"
    # How often each backend's own load report (llama.cpp /slots, vLLM /metrics) is read.
    load_interval: Seconds = 2.0


class BackendConfig(_Section):
    name: BackendName
    runtime: Runtime
    # Managed: the gateway spawns the runtime with this model (a GGUF path for llama.cpp,
    # a model id for vLLM, a tag for Ollama).
    model: str | None = None
    binary: str | list[str] | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    port: int | None = Field(default=None, ge=1, le=65535)
    # Attached: an already-running server the gateway only forwards to.
    url: Url | None = None
    # Public model names this backend answers; default derived from `model`.
    serves: list[Name] = []
    # Requests it may run at once (llama.cpp -np, vLLM --max-num-seqs, OLLAMA_NUM_PARALLEL).
    slots: int = Field(default=1, ge=1, le=1024)
    # Context tokens each slot gets (llama.cpp is started with -c context*slots).
    context: int = Field(default=4096, ge=256)
    embeddings: bool = False
    api_key: Annotated[str, AfterValidator(_token)] | None = None
    startup_timeout: Seconds = 120.0
    stop_timeout: Seconds = 10.0
    # Share of a model group's traffic relative to its peers (with equal load).
    weight: float = Field(default=1.0, gt=0)
    # GPU selection for a managed process (CUDA_VISIBLE_DEVICES), e.g. "0" or "0,1".
    gpus: str | None = None
    # eager: started with the gateway. on_demand: started by the first request for it, and
    # stopped again after `idle_ttl` without requests.
    start: Literal["eager", "on_demand"] = "eager"
    idle_ttl: Seconds | None = None
    # Backends in one exclusive group share a GPU: only one of them runs at a time.
    group: BackendName | None = None
    # Liveness once ready: a probe every `health_interval`; `health_failures` misses in a row
    # mark it unhealthy and restart it. A probe times out after `health_timeout`.
    health_interval: Seconds = 10.0
    health_timeout: Seconds = 5.0
    health_failures: int = Field(default=3, ge=1)
    # Crash restarts: backoff doubles from `restart_backoff` up to `restart_backoff_max`; more
    # than `crash_limit` crashes within `crash_window` park the backend in `failed`.
    restart_backoff: Seconds = 1.0
    restart_backoff_max: Seconds = 60.0
    crash_limit: int = Field(default=5, ge=1)
    crash_window: Seconds = 600.0


class Config(_Section):
    data_dir: Path
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    backends: list[BackendConfig] = Field(min_length=1)
    models: ModelsConfig = ModelsConfig()
    routing: RoutingConfig = RoutingConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    metrics: MetricsConfig = MetricsConfig()


# --- loading -------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string, recording unset variables."""
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _VAR.sub(replace, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _describe(error: dict[str, Any]) -> str:
    path = ""
    for part in error["loc"]:
        # pydantic names the member of a union it tried (`str`, `list[str]`, `function-after[...]`).
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "list", "float")):
            continue
        path = _join(path, part)
    kind = error["type"]
    if kind == "extra_forbidden":
        reason = "unknown field"
    elif kind == "missing":
        reason = "required"
    elif kind == "value_error":
        reason = str(error["ctx"]["error"])
    elif kind == "too_short":
        reason = f"needs at least {error['ctx']['min_length']} item(s)"
    else:
        reason = error["msg"][0].lower() + error["msg"][1:]
    return f"{path or '(top level)'}: {reason}"


def _derived_serves(backend: BackendConfig) -> list[str]:
    if backend.serves:
        return list(backend.serves)
    if backend.model is None:
        return []
    if backend.runtime == "llamacpp":
        return [Path(backend.model).stem]
    return [backend.model]


def _check_semantics(config: Config) -> list[str]:
    """Cross-field rules pydantic cannot express per field."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    served: set[str] = set()
    ports = {config.server.port: "server.port"}
    for i, backend in enumerate(config.backends):
        at = f"backends[{i}]"
        if backend.port is not None and backend.url is None:
            if backend.port in ports:
                problems.append(f"{at}.port: {backend.port} is already {ports[backend.port]}")
            ports.setdefault(backend.port, f"{at}.port")
        if backend.name in seen:
            problems.append(f"{at}.name: duplicate backend name {backend.name!r} (also backends[{seen[backend.name]}])")
        seen.setdefault(backend.name, i)
        if (backend.model is None) == (backend.url is None):
            problems.append(f"{at}: set exactly one of `model` (a managed process) or `url` (an attached server)")
        if backend.runtime == "openai" and backend.url is None:
            problems.append(f"{at}.url: required for runtime 'openai' (the gateway cannot spawn it)")
        if backend.url is not None and backend.api_key is not None and _USERINFO.search(backend.url):
            # Both would be the one Authorization header (the probes' client refuses the pair).
            problems.append(f"{at}: give the backend's credentials once, as `api_key` or as the url's user:password")
        if backend.url is not None:
            for field in ("binary", "port", "gpus", "group", "idle_ttl"):
                if getattr(backend, field) is not None:
                    problems.append(f"{at}.{field}: only for a managed backend, not with `url`")
            if backend.args or backend.env:
                problems.append(f"{at}: `args` and `env` are only for a managed backend, not with `url`")
            if backend.start == "on_demand":
                problems.append(f"{at}.start: on_demand needs a managed backend (the gateway cannot start a `url`)")
        if backend.idle_ttl is not None and backend.start != "on_demand":
            problems.append(f"{at}.idle_ttl: only with `start: on_demand` (an eager backend is never stopped)")
        names = _derived_serves(backend)
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            problems.append(f"{at}.serves: {', '.join(map(repr, twice))} listed more than once")
        if not names and backend.url is not None:
            problems.append(f"{at}.serves: required for an attached backend (the model names it answers)")
        served.update(names)
    for name, override in config.models.overrides.items():
        if name not in served:
            problems.append(f"models.overrides.{name}: not a served model name")
        if override.max_body is not None and override.max_body > config.server.max_body:
            problems.append(f"models.overrides.{name}.max_body: larger than server.max_body, which bounds every body")
    for alias, target in config.models.aliases.items():
        if alias in served:
            problems.append(f"models.aliases.{alias}: already a served model name")
        if target not in served:
            problems.append(f"models.aliases.{alias}: target {target!r} is not served by any backend")
    if (refusal := keyless_exposure(config.auth, config.server.host)) is not None:
        problems.append(f"server.host: {refusal}")
    return problems


def keyless_exposure(auth: AuthConfig, host: str) -> str | None:
    """Why the gateway must not listen on `host` with these auth settings, or None. (Also checked
    by `serve` against its --host.)"""
    if auth.required or auth.allow_public_without_keys or _loopback(host):
        return None
    return (f"auth.required is false, so the gateway only binds a loopback address, not {host}; "
            "set auth.allow_public_without_keys: true to serve every client on the network without keys")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(raw: Any, *, base_dir: Path, env: dict[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"])
    problems: list[str] = []
    document = _interpolate(raw, "", dict(os.environ if env is None else env), problems)
    document.setdefault("data_dir", "data")
    try:
        config = Config.model_validate(document)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors())
        raise ConfigError(problems) from None
    problems.extend(_check_semantics(config))
    if problems:
        raise ConfigError(problems)
    return resolve_paths(config, base_dir)


def warnings(config: Config) -> list[str]:
    """What is valid but will not work as it stands: `check` prints these, `serve` logs them.
    Not errors: a model file or a binary may appear before the backend starts (a mount, a pull),
    and one broken backend must not keep the others from serving."""
    found: list[str] = []
    for i, backend in enumerate(config.backends):
        at = f"backends[{i}] ({backend.name})"
        if backend.url is None and backend.runtime == "llamacpp" and backend.model is not None:
            if not os.access(backend.model, os.R_OK) or not Path(backend.model).is_file():
                found.append(f"{at}.model: {backend.model} is not a readable file; the backend will fail to start")
        if backend.url is None and backend.binary:
            program = backend.binary if isinstance(backend.binary, str) else backend.binary[0]
            if shutil.which(program) is None:
                found.append(f"{at}.binary: {program} is not an executable file (nor a command on PATH)")
    if not config.admin.key:
        found.append("admin.key is not set: the admin API (keys, usage, reload) answers 403, so no API key "
                     "can be issued" + (" and, with auth.required, no client can be served" if config.auth.required
                                        else ""))
    return found


def resolve_paths(config: Config, base_dir: Path) -> Config:
    """Relative paths in the file are relative to the file, not to the working directory."""

    def absolute(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (base_dir / p).resolve())

    backends = []
    for backend in config.backends:
        update: dict[str, Any] = {"serves": _derived_serves(backend)}
        if backend.runtime == "llamacpp" and backend.model is not None:
            update["model"] = absolute(backend.model)
        if backend.binary:
            # A path (with a slash) is relative to the file; a bare name is looked up on PATH.
            argv = [backend.binary] if isinstance(backend.binary, str) else list(backend.binary)
            if "/" in argv[0]:
                argv[0] = absolute(argv[0])
            update["binary"] = argv[0] if isinstance(backend.binary, str) else argv
        backends.append(backend.model_copy(update=update))
    return config.model_copy(
        update={"data_dir": Path(absolute(str(config.data_dir))), "backends": backends}
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML lets the last one win
    silently, so a second `server:` section would drop the whole first one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given beside it override the merged ones
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse(raw, base_dir=file.resolve().parent, env=env)
