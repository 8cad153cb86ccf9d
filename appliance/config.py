"""One typed settings object for every process, read from the environment and `.env`.

Why one object: every process reads the same keys the same way, and a wrong value
stops the process at start with the key's name and what was expected, instead of
failing later somewhere far away. The table in README.md lists every key.

Precedence: process environment > `$APPLIANCE_HOME/.env` > defaults.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class ConfigError(SystemExit):
    """A setting is wrong: the process stops with a message that names the key."""

    def __init__(self, message: str):
        super().__init__(f"appliance: configuration error: {message}")


Port = Annotated[int, Meta(ge=0, le=65535)]

# What a bearer token may allow (README, Security). Here, beside the settings that name
# them (RATE_LIMITS), so that security and the API's rate limiter share one list.
SCOPES = ("tasks:write", "tasks:read", "rag:write", "rag:read", "gpu:read", "admin")


class RateLimit(msgspec.Struct, frozen=True):
    per_s: float  # tokens added per second
    burst: int    # bucket size


_RATE_RULE = re.compile(r"^\s*([a-z:]+)\s*=\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*:\s*(\d+)\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


@functools.lru_cache(maxsize=8)
def parse_rate_limits(text: str) -> dict[str, RateLimit]:
    """"tasks:write=100/s:200,admin=10/m:5" -> {scope: RateLimit}; ConfigError names the bad part."""
    limits: dict[str, RateLimit] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _RATE_RULE.match(part)
        if not m:
            raise ConfigError(f"RATE_LIMITS: {part!r} is not SCOPE=RATE/UNIT:BURST (e.g. tasks:write=100/s:200)")
        scope, rate, unit, burst = m.group(1), float(m.group(2)), m.group(3), int(m.group(4))
        if scope not in SCOPES:
            raise ConfigError(f"RATE_LIMITS: unknown scope {scope!r}; known: {', '.join(SCOPES)}")
        if rate <= 0 or burst < 1:
            raise ConfigError(f"RATE_LIMITS: {part!r}: the rate must be > 0 and the burst >= 1")
        limits[scope] = RateLimit(rate / _PER[unit], burst)
    return limits


class Settings(msgspec.Struct, rename="upper", forbid_unknown_fields=False):
    appliance_home: str = ""
    data_dir: str = ""
    run_dir: str = ""
    log_dir: str = ""

    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    api_workers: Annotated[int, Meta(ge=1, le=64)] = 2
    api_connections: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1_048_576
    # How long an API call waits for the broker before 503 broker_unavailable. 5 s, not 1:
    # a broker restart (~1 s) or a slow journal fsync on a busy disk then costs latency, not
    # errors (CI's soak saw 503s from a >1 s pause at 1 s); /readyz still answers within 1 s.
    broker_timeout_s: Annotated[float, Meta(gt=0)] = 5.0

    database_url: str = ""  # sqlite:///PATH (default DATA_DIR/journal.sqlite3); the journal
    broker_front: str = ""
    broker_back: str = ""
    broker_events: str = ""
    telemetry_endpoint: str = ""
    queue_max_size: Annotated[int, Meta(ge=1)] = 1000
    # several boxes on one PostgreSQL queue (README "Several boxes"; appliance/store/shared_queue.py)
    queue_scope: Literal["box", "shared"] = "box"
    box_name: str = ""  # this box in the shared queue; default: the host name (lower case, [a-z0-9_-])
    lease_s: Annotated[float, Meta(ge=2, le=600)] = 15.0  # a box that stops renewing loses its tasks after this
    queue_aging_s: Annotated[float, Meta(ge=0)] = 30.0
    result_ttl_s: Annotated[float, Meta(gt=0)] = 300.0
    result_tombstone_s: Annotated[float, Meta(ge=0)] = 3600.0
    task_timeout_max_s: Annotated[float, Meta(gt=0)] = 600.0
    max_tokens_limit: Annotated[int, Meta(ge=1, le=32768)] = 32768  # the largest max_tokens a task may ask for
    max_batch: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    health_stall_s: Annotated[float, Meta(gt=0)] = 30.0
    worker_liveness_s: Annotated[float, Meta(ge=2.0, le=300.0)] = 10.0
    health_backlog_wait_s: Annotated[float, Meta(gt=0)] = 30.0
    # On a stop, running tasks get this long to finish (README "Reliability"). At most 45:
    # supervisord.conf gives the broker and the API 60 s to stop before it kills them.
    drain_grace_s: Annotated[float, Meta(ge=0, le=45)] = 30.0

    instances_file: str = ""  # TOML (appliance/instances.py); default: instances.toml in the home, if there
    llama_instances: Annotated[int, Meta(ge=1, le=64)] = 3  # instances of MODEL_PATH when there is no file
    default_model: str = ""   # the model of a task that names none; default: the first instance's
    model_path: str = ""
    model_alias: str = ""
    llama_server_bin: str = ""
    llama_host: str = "127.0.0.1"
    llama_port_base: Port = 0
    llama_slots: Annotated[int, Meta(ge=1, le=256)] = 2
    llama_ctx: Annotated[int, Meta(ge=256)] = 4096
    llama_threads: Annotated[int, Meta(ge=1)] = 1
    llama_gpu_layers: Annotated[int, Meta(ge=0)] = 0
    llama_start_timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    # llama.cpp's host-memory prompt cache per instance (its own default, 8192 MiB, let a
    # default appliance of three instances grow towards 24 GiB of RAM); 0: off, -1: no limit
    llama_cache_ram_mib: Annotated[int, Meta(ge=-1)] = 256

    # routing (README, "Routing"; appliance/broker/routing.py)
    affinity_slack: Annotated[int, Meta(ge=0, le=1000)] = 1  # running tasks a conversation's instance may
                                                              # have beyond the least busy one and keep it
    critical_max_wait_ms: Annotated[float, Meta(ge=0)] = 1000.0  # then preempt lower work; 0: never
    thermal_limit_c: Annotated[float, Meta(gt=0, le=120)] = 85.0   # an instance's GPU this hot: no new work
    thermal_resume_c: Annotated[float, Meta(gt=0, le=120)] = 80.0  # ... until it is this cool again
    memory_pressure_pct: Annotated[float, Meta(gt=0, le=100)] = 95.0  # GPU memory this full: no new work
    gpu_cuda_context_mb: Annotated[float, Meta(ge=0)] = 650.0       # per process, in memory forecasts
    gpu_plan_headroom_pct: Annotated[float, Meta(ge=0, lt=100)] = 10.0  # GPU memory plans keep free

    # retrieval (README "Retrieval"; appliance/rag/)
    rag_embedder: str = "minilm"  # or llama:MODEL_ID (a configured model with embeddings, via the broker)
    rag_slots: Annotated[int, Meta(ge=2, le=64)] = 8       # RAG tasks at once (an answer waits on its model)
    rag_reserved: Annotated[int, Meta(ge=1, le=63)] = 2    # of those, kept for critical and high work (search)
    rag_threads: Annotated[int, Meta(ge=1, le=64)] = 1     # onnxruntime threads per embedding call
    rag_chunk_tokens: Annotated[int, Meta(ge=16, le=512)] = 200
    rag_chunk_overlap: Annotated[int, Meta(ge=0, le=256)] = 40
    rag_max_doc_chars: Annotated[int, Meta(ge=1)] = 1_000_000
    rag_compact_pct: Annotated[float, Meta(gt=0, le=100)] = 20.0  # deleted share of the index that rebuilds it
    rag_sample: Literal["", "icd10cm"] = ""  # a sample to index at first start (`make run`: icd10cm)

    gpumon_interval_s: Annotated[float, Meta(gt=0)] = 2.0
    nvml_samples: str = ""

    # security (README "Security"; checked at start by appliance.security.check_startup)
    allow_insecure_dev: bool = False
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_secret_key: str = ""
    jwt_public_key_file: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: Annotated[float, Meta(ge=0, le=300)] = 30.0
    tenant_claim: Annotated[str, Meta(min_length=1)] = "sub"
    cors_origins: str = ""
    rate_limits: str = ("tasks:write=100/s:200,tasks:read=500/s:1000,rag:write=20/s:50,rag:read=100/s:200,"
                        "gpu:read=50/s:100,admin=10/s:20")
    ops_endpoints: Literal["loopback_or_token", "token", "open"] = "loopback_or_token"
    max_prompt_chars: Annotated[int, Meta(ge=1)] = 200_000
    audit_log: str = ""
    audit_key: str = ""
    log_clinical_text: bool = False

    # ------------------------------------------------------------ derived paths
    @property
    def home(self) -> Path:
        return Path(self.appliance_home)

    @property
    def model_file(self) -> Path:
        """The configured GGUF, or the generated tiny model when none is configured."""
        if self.model_path:
            return Path(self.model_path)
        return Path(self.data_dir) / "models" / "appliance-tiny.gguf"

    @property
    def uses_tiny_model(self) -> bool:
        return not self.model_path

    @property
    def model_name(self) -> str:
        return self.model_alias or self.model_file.stem

    @property
    def journal_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:///")

    @property
    def journal_path(self) -> str:
        """The SQLite journal's file; for PostgreSQL, where it is (never its password)."""
        if self.journal_sqlite:
            return self.database_url.removeprefix("sqlite:///")
        from urllib.parse import urlsplit

        u = urlsplit(self.database_url)
        port = f":{u.port}" if u.port else ""
        return f"postgresql://{u.username + '@' if u.username else ''}{u.hostname or ''}{port}{u.path}"

    @property
    def rate_limit_rules(self) -> dict[str, RateLimit]:
        """RATE_LIMITS, parsed (and checked when the settings were loaded)."""
        return parse_rate_limits(self.rate_limits)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


# Settings whose values are secrets: never printed, never logged.
SECRET_KEYS = frozenset({"JWT_SECRET_KEY", "AUDIT_KEY"})


def dotenv_line(line: str) -> tuple[str, str] | None:
    """(key, value) of one .env line; None for a blank line or a comment.

    The one reading of the syntax (`export ` prefix, surrounding quotes), for the
    settings and for `appliance init`, which rewrites the file line by line.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith("export "):
        line = line[len("export ") :]
    key, sep, value = line.partition("=")
    if not sep:
        raise ValueError("expected KEY=VALUE")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.strip(), value


def _read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        try:
            kv = dotenv_line(raw)
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: {exc}") from None
        if kv is not None:
            values[kv[0]] = kv[1]
    return values


def home_dir(environ: dict[str, str] | None = None) -> Path:
    """APPLIANCE_HOME, or the current directory."""
    env = os.environ if environ is None else environ
    return Path(env.get("APPLIANCE_HOME") or os.getcwd()).resolve()


_FIELDS = {name.upper() for name in Settings.__struct_fields__}

# Keys that used to mean something: said once at start instead of silently ignored.
RETIRED = {"API_THREADS": "the API runs gevent workers now; set API_CONNECTIONS (open connections per worker)"}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    home = home_dir(env)
    raw = _read_dotenv(home / ".env")
    for key in RETIRED.keys() & (raw.keys() | env.keys()):
        logging.getLogger("appliance.config").warning("%s is no longer read: %s", key, RETIRED[key])
    raw.update({k: v for k, v in env.items() if k in _FIELDS})
    raw["APPLIANCE_HOME"] = str(home)
    try:
        s = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc).replace("`$.", "`")) from None
    parse_rate_limits(s.rate_limits)  # a typo is refused at start, naming the part, in every process
    if s.thermal_resume_c > s.thermal_limit_c:
        raise ConfigError(f"THERMAL_RESUME_C ({s.thermal_resume_c:g}) must not be above THERMAL_LIMIT_C "
                          f"({s.thermal_limit_c:g}): a GPU would never be let back in")
    if s.rag_reserved >= s.rag_slots:
        raise ConfigError(f"RAG_RESERVED ({s.rag_reserved}) must be below RAG_SLOTS ({s.rag_slots}): "
                          "documents could never be indexed")
    if s.rag_chunk_overlap >= s.rag_chunk_tokens:
        raise ConfigError(f"RAG_CHUNK_OVERLAP ({s.rag_chunk_overlap}) must be below RAG_CHUNK_TOKENS "
                          f"({s.rag_chunk_tokens})")
    var = home / "var"
    s.data_dir = s.data_dir or str(var / "data")
    s.run_dir = s.run_dir or str(var / "run")
    s.log_dir = s.log_dir or str(var / "log")
    run = Path(s.run_dir)
    s.broker_front = s.broker_front or f"ipc://{run}/broker-front.ipc"
    s.broker_back = s.broker_back or f"ipc://{run}/broker-back.ipc"
    s.broker_events = s.broker_events or f"ipc://{run}/broker-events.ipc"
    s.telemetry_endpoint = s.telemetry_endpoint or f"ipc://{run}/telemetry.ipc"
    s.audit_log = s.audit_log or str(Path(s.log_dir) / "audit.jsonl")
    s.database_url = s.database_url or f"sqlite:///{Path(s.data_dir) / 'journal.sqlite3'}"
    if not s.database_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        scheme = s.database_url.split(":", 1)[0]  # never the whole URL: it may hold a password
        raise ConfigError(f"DATABASE_URL: scheme {scheme!r} is not supported; use sqlite:///PATH or "
                          "postgresql://USER:PASSWORD@HOST:PORT/DB (postgres:// too)")
    if s.queue_scope == "shared":
        if s.journal_sqlite:
            raise ConfigError("QUEUE_SCOPE=shared needs DATABASE_URL=postgresql://...: boxes share the queue "
                              "through PostgreSQL")
        s.box_name = s.box_name or re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().lower())[:40].strip("-_") or "box"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", s.box_name):
            raise ConfigError(f"BOX_NAME {s.box_name!r}: 1-40 characters a-z 0-9 _ -, starting with a letter "
                              "or digit (it names a PostgreSQL channel)")
    for endpoint in (s.broker_front, s.broker_back, s.broker_events, s.telemetry_endpoint):
        if endpoint.startswith("ipc://") and len(endpoint) - 6 > 100:
            raise ConfigError(f"ipc path too long for a unix socket: {endpoint} (set RUN_DIR shorter)")
    return s


def ensure_dirs(s: Settings) -> None:
    for d in (s.data_dir, s.run_dir, s.log_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
