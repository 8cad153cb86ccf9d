"""The one contract between the appliance's processes (see docs/PROTOCOL.md).

Every message is a msgspec Struct, MessagePack on the wire, one message per ZeroMQ
frame. Structs are tagged (the tag is the first array element) and array-like, which
makes them small and about twice as fast to encode as maps. Change this module and
docs/PROTOCOL.md together.

The HTTP request types (TaskSpec: one Struct per task type) live here too: the API
decodes a request body straight into the struct it forwards to the broker, so there
is one schema and no copy.
"""
from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1

# Heartbeats, both ways between broker and workers, every HEARTBEAT_INTERVAL_S. A
# peer silent for WORKER_LIVENESS_S (a setting, default 10 s) is considered gone: long
# enough that a process starved of CPU on a busy box for a few seconds is not taken
# for dead (its running tasks would run a second time elsewhere).
HEARTBEAT_INTERVAL_S = 1.0

PRIORITIES: tuple[str, ...] = ("critical", "high", "normal", "low", "batch")
Priority = Literal["critical", "high", "normal", "low", "batch"]
LEVEL = {name: i for i, name in enumerate(PRIORITIES)}

TaskState = Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
FINAL_STATES = frozenset({"completed", "failed", "cancelled", "expired"})

# ---------------------------------------------------------------- task payloads


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=1_000_000)]


TaskType = Literal["chat", "complete", "embed", "extract", "rag_answer", "rag_ingest", "rag_search", "rag_docs"]
Text = Annotated[str, Meta(max_length=1_000_000)]
Messages = Annotated[list[ChatMessage], Meta(min_length=1, max_length=1000)]


class _Task(Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """What every task type has. `type` is the tag: each type is its own Struct, so a
    client's request decodes straight into exactly the fields that type needs (the
    OpenAPI document states them as a discriminated union)."""

    model: Annotated[str, Meta(min_length=1, max_length=200,
                               description="the model id (GET /v1/models); the configured default when absent")
                     ] | None = None
    priority: Priority = "normal"
    timeout_s: Annotated[float, Meta(gt=0.0, le=86400.0, description=(
        "seconds from submit to a final state (queued time included); default 60, or TASK_TIMEOUT_MAX_S if "
        "that is less"))] | None = None

    @property
    def type(self) -> TaskType:
        return self.__struct_config__.tag


class _Generation(_Task, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1, le=32768, description=(
        "tokens to generate at most; default 128, or MAX_TOKENS_LIMIT if that is less"))] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=5.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    session_id: Annotated[str, Meta(min_length=1, max_length=200, description=(
        "a conversation's id: its turns go to the instance that holds its prompt in cache, load permitting "
        "(without it, the leading messages identify the conversation)"))] | None = None


class ChatTask(_Generation, tag="chat", kw_only=True):
    """A chat completion: the model's reply to `messages`."""

    messages: Messages


class CompleteTask(_Generation, tag="complete", kw_only=True):
    """A plain text completion of `prompt`."""

    prompt: Text


class EmbedTask(_Task, tag="embed", kw_only=True):
    """One embedding vector per text."""

    texts: Annotated[list[Annotated[str, Meta(max_length=100_000)]], Meta(min_length=1, max_length=256)]


class ExtractTask(_Generation, tag="extract", kw_only=True):
    """Structured output: JSON valid against `json_schema` (a JSON Schema object).

    Decoding is constrained by a llama.cpp grammar made from the schema where the
    schema's keywords allow it (appliance/grammar.py), and the output is always
    validated against the whole schema: the result's `data` is valid, or the task
    fails `extract_invalid`."""

    messages: Messages
    json_schema: Annotated[dict[str, Any], Meta(min_length=1)]


# ------------------------------------------------------------- RAG payloads

RAG_SERVICE = "rag"  # the service the RAG worker serves: not a model (never in /v1/models)
SearchMode = Literal["vector", "keyword", "hybrid"]
# MessagePack carries 64-bit integers: a larger JSON integer is refused at the door (422)
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
FilterValue = Union[str, Int64, float, bool]


class FilterIn(Struct, forbid_unknown_fields=True):
    """{"in": [values]}: the field equals one of them."""

    in_: Annotated[list[FilterValue], Meta(min_length=1, max_length=100)] = msgspec.field(name="in")


# {"field": value} or {"field": {"in": [values]}}: equality on a document's metadata
Filter = Annotated[dict[Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Union[FilterValue, FilterIn]],
                   Meta(max_length=16, description=(
                       'metadata equality filters: {"field": value} or {"field": {"in": [values]}}'))]
K = Annotated[int, Meta(ge=1, le=50, description="chunks to return")]


class RagAnswerTask(_Generation, tag="rag_answer", kw_only=True):
    """Retrieve from the caller's documents, then answer from the numbered sources.

    `model` is the model that writes the answer. The result's `data` holds the cited
    chunks (ids, titles, offsets): only sources that were retrieved can be cited."""

    question: Text
    k: K = 5
    filter: Filter | None = None
    mode: SearchMode = "hybrid"


class _RagOp(_Task, kw_only=True):
    """Internal task types: made by the API's /v1/rag resources (the async submit
    refuses them), run by the RAG worker. The tenant comes from the broker's record
    (Dispatch.tenant), never from the spec."""


class RagDocument(Struct, forbid_unknown_fields=True, omit_defaults=True):
    document_id: str
    title: Annotated[str, Meta(min_length=1, max_length=500)]
    text: Annotated[str, Meta(min_length=1)]  # bounded by RAG_MAX_DOC_CHARS (API)
    metadata: dict[str, Any] = {}
    shared: bool = False  # site-wide: every tenant sees it (admin callers only, checked by the API)


class RagIngestTask(_RagOp, tag="rag_ingest", kw_only=True):
    """One document (the API's POST), or many small ones (`appliance rag load-icd10cm`:
    one task per 64 codes costs the broker 1/64 of the work and lets their chunks be
    embedded together)."""

    documents: Annotated[list[RagDocument], Meta(min_length=1, max_length=256)]


class RagSearchTask(_RagOp, tag="rag_search", kw_only=True):
    query: Text
    k: K = 5
    filter: Filter | None = None
    mode: SearchMode = "hybrid"


class RagDocsTask(_RagOp, tag="rag_docs", kw_only=True):
    op: Literal["list", "get", "delete"]
    document_id: str | None = None
    limit: int = 100
    offset: int = 0
    admin: bool = False  # the caller is an admin: may delete site-wide documents


# What clients may submit (POST /v1/async/submit); the wire carries the internal ones too.
ClientTaskSpec = Union[ChatTask, CompleteTask, EmbedTask, ExtractTask, RagAnswerTask]
TaskSpec = Union[ChatTask, CompleteTask, EmbedTask, ExtractTask, RagAnswerTask, RagIngestTask, RagSearchTask,
                 RagDocsTask]
RAG_TYPES = frozenset({"rag_answer", "rag_ingest", "rag_search", "rag_docs"})


def document_id(tenant: str, text: str) -> str:
    """A document's id, from its tenant and its text: the same text sent twice by the
    same tenant is the same document, so ingestion is idempotent."""
    content = hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(f"{tenant}\0{content}".encode()).hexdigest()[:32]


def service_of(spec: TaskSpec, default_model: str) -> str:
    """The queue a task waits in: the RAG worker's for RAG work (a rag_answer's `model`
    is the model it asks for the answer, later), else its model's."""
    if spec.type in RAG_TYPES:
        return RAG_SERVICE
    return spec.model or default_model


DEFAULT_TIMEOUT_S = 60.0  # a task's timeout when it names none (at most TASK_TIMEOUT_MAX_S)
DEFAULT_MAX_TOKENS = 128  # a generation's max_tokens when it names none (at most MAX_TOKENS_LIMIT)


def _texts(spec: TaskSpec) -> tuple[str, list[str]]:
    """The field name pattern and every text a task carries (a document to index has
    its own bound, RAG_MAX_DOC_CHARS)."""
    if isinstance(spec, EmbedTask):
        return "texts[{}]", spec.texts
    if isinstance(spec, CompleteTask):
        return "prompt", [spec.prompt]
    if isinstance(spec, RagAnswerTask):
        return "question", [spec.question]
    if isinstance(spec, RagSearchTask):
        return "query", [spec.query]
    if isinstance(spec, (ChatTask, ExtractTask)):
        return "messages[{}].content", [m.content for m in spec.messages]
    return "", []


def check_bounds(spec: TaskSpec, timeout_max_s: float | None = None, max_prompt_chars: int | None = None,
                 max_tokens: int | None = None) -> tuple[str, str] | None:
    """The configured bounds msgspec cannot know at import time: (field, message) or None.

    MAX_PROMPT_CHARS bounds each text on its own, not their sum: a bound per field is
    one the OpenAPI document can state exactly (maxLength), and MAX_BODY_BYTES bounds
    the whole request."""
    if timeout_max_s is not None and spec.timeout_s is not None and spec.timeout_s > timeout_max_s:
        return "timeout_s", f"at most {timeout_max_s:g} seconds (TASK_TIMEOUT_MAX_S)"
    if (max_tokens is not None and isinstance(spec, _Generation) and spec.max_tokens is not None
            and spec.max_tokens > max_tokens):
        return "max_tokens", f"at most {max_tokens} (MAX_TOKENS_LIMIT)"
    if max_prompt_chars is not None:
        field, texts = _texts(spec)
        for i, text in enumerate(texts):
            if len(text) > max_prompt_chars:  # the name is made only for the message
                return field.format(i), f"{len(text)} characters; at most {max_prompt_chars} (MAX_PROMPT_CHARS)"
    return None


def with_defaults(spec: TaskSpec, timeout_max_s: float, max_tokens_limit: int) -> TaskSpec:
    """The spec with its timeout and max_tokens in force: its own, else the default
    within the configured bound (a default above the bound would refuse a request that
    names neither)."""
    if spec.timeout_s is None:
        spec.timeout_s = min(DEFAULT_TIMEOUT_S, timeout_max_s)
    if isinstance(spec, _Generation) and spec.max_tokens is None:
        spec.max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    return spec


class Timings(Struct, omit_defaults=True):
    """llama.cpp's own timings of a generation, as it reports them."""

    prompt_n: int = 0            # prompt tokens evaluated (not taken from the cache)
    cache_n: int = 0             # prompt tokens reused from the slot's cache
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_second: float = 0.0


class Sampling(Struct, omit_defaults=True):
    """The sampling parameters a generation ran with, every one explicit: with the
    seed, the same model file and the same input give the same output again."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    max_tokens: int


class Provenance(Struct, omit_defaults=True):
    """What produced a result, for clinical reproducibility."""

    model: str             # the model id
    gguf_sha256: str       # of the model file, computed when the instance started
    quantization: str      # the GGUF's file type (e.g. Q4_K_M, F16)
    instance: str          # the instance that ran it
    sampling: Sampling | None = None  # generations only


class TaskResult(Struct, omit_defaults=True):
    text: str = ""
    data: Any = None                           # extract: the parsed JSON
    embeddings: list[list[float]] | None = None  # embed: one vector per text
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0                     # prompt tokens llama.cpp took from its cache
    model: str = ""
    timings: Timings | None = None
    provenance: Provenance | None = None


class TaskError(Struct):
    code: str
    message: str


class TaskRecord(Struct, omit_defaults=True):
    """Everything the broker knows of one task; what status and result return."""

    task_id: str
    state: TaskState
    type: str
    priority: Priority
    created_at: float
    tenant: str = ""
    model: str = ""               # the model id it runs on (the default applied)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    result: TaskResult | None = None
    error: TaskError | None = None
    result_expired: bool = False  # past RESULT_TTL_S: the result itself is gone
    attempts: int = 0             # times it was dispatched (2: re-run after its instance was lost)
    preempted: int = 0            # times it was stopped to free a slot for critical work
    pin: str | None = None        # runs only on this instance (GPU benchmarks); None: wherever routing says
    box: str | None = None        # the box it ran on (QUEUE_SCOPE=shared); None: one box


# ------------------------------------------------- api <-> broker (front ROUTER)


class _Msg(Struct, tag=True, array_like=True):
    pass


class Submit(_Msg):
    """`task_id` may be proposed by the API (so it can subscribe to the task's events
    before submitting); with an `idempotency_key` already seen for this tenant, the
    broker answers with the earlier task instead of creating one."""

    req: int
    spec: TaskSpec
    tenant: str = ""
    task_id: str | None = None
    idempotency_key: str | None = None
    # Wall-clock time after which the caller has stopped waiting (and answered 503): a
    # submit read later (a frozen or backed-up broker) is dropped, not run unseen. 0: none.
    expires_at: float = 0.0
    pin: str | None = None  # an instance name: the task runs there only (set by the API, never by clients)


class SubmitBatch(_Msg):
    """All or nothing: every spec is queued, or none is and the reply says why."""

    req: int
    specs: list[TaskSpec]
    tenant: str = ""
    expires_at: float = 0.0  # as Submit's


class Query(_Msg):
    """Ask for one task's record (status and result share it).

    A task of another tenant is `not_found`, exactly like an unknown id, unless
    `all_tenants` (an admin caller): existence must not leak across tenants.
    """

    req: int
    task_id: str
    tenant: str = ""
    all_tenants: bool = False


class Cancel(_Msg):
    """Same tenant rule as Query."""

    req: int
    task_id: str
    tenant: str = ""
    all_tenants: bool = False


class Ping(_Msg):
    req: int


class GetStats(_Msg):
    req: int


class Accepted(_Msg):
    req: int
    task_id: str
    state: TaskState


class BatchAccepted(_Msg):
    req: int
    task_ids: list[str]


class TaskInfo(_Msg):
    req: int
    task: TaskRecord
    position: int | None = None      # tasks ahead of a queued one, None otherwise
    text_so_far: str | None = None   # a running task's generated text until now
    tokens_seq: int = 0              # the last Tokens message included in text_so_far


class WorkerStats(Struct):
    name: str
    model: str
    endpoint: str                  # the llama.cpp server's base URL
    slots: int
    running: int
    credit: int
    reserved: int = 0              # slots only critical and high work may take
    gpu: int = -1                  # the GPU it is pinned to; -1: CPU only
    starts: int = 1                # times the instance started since the appliance came up
    throttled: bool = False        # its GPU is too hot: it gets no new work
    seconds_per_token: float = 0.0  # EWMA of its generation speed (0: not measured yet)
    stopping: bool = False         # it is shutting down: finishes what it runs, takes nothing new
    throttle_reason: str = ""      # why its GPU gets no new work (empty: it does)


class Stats(_Msg):
    req: int
    depth: dict[str, int]          # queued tasks per priority
    queued: int
    running: int
    max_size: int
    workers: list[WorkerStats]
    dispatch_p50_ms: float         # queued -> running, over the last DISPATCH_WINDOW tasks
    dispatch_p95_ms: float
    dispatch_p99_ms: float
    completed_per_min: float       # tasks that reached a final state in the last 60 s
    finished: dict[str, int]       # final states since the broker started
    oldest_queued_s: float
    last_progress_s: float         # seconds since the last dispatch or final state
    health: Literal["healthy", "backing_up", "stalled"]
    health_reason: str
    replies_deferred: int = 0       # replies that waited for a slow client to read
    replies_undeliverable: int = 0  # replies whose client was gone: counted and logged
    workers_dropped: int = 0        # workers silent past WORKER_LIVENESS_S
    depth_by_model: dict[str, int] = {}  # queued tasks per model
    preemptions: int = 0            # running tasks stopped to free a slot for critical work
    journal_errors: int = 0         # failed journal writes (disk full, read-only) since the broker started
    submits_expired: int = 0        # submits read after their caller gave up (expires_at): dropped
    frames_dropped: dict[str, int] = {}  # malformed messages dropped, per socket (front, back, telemetry)
    rag_workers: list[WorkerStats] = []  # the RAG service's workers (`workers`: the model instances)
    box: str = ""                   # QUEUE_SCOPE=shared: this box's name ("" on a box of its own)
    boxes: list[str] = []           # the boxes that renewed their leases lately
    shared_queued: int = 0          # tasks in the shared queue that no box holds yet


class GetGpu(_Msg):
    req: int


class GpuState(Struct):
    """The broker's routing view of one GPU (appliance/broker/routing.py, gpu_state)."""

    index: int
    throttled: bool
    reason: str = ""


class GpuStatus(_Msg):
    """The latest telemetry the broker holds (None: none yet), its throttle states, and
    the registered instances (each with its GPU)."""

    req: int
    telemetry: Telemetry | None
    states: list[GpuState]
    workers: list[WorkerStats]


class Pong(_Msg):
    req: int
    workers_ready: int
    queued: int
    running: int
    gpu_state: str
    models: list[str] = []      # models with a registered instance
    configured: list[str] = []  # models the instances file names (served or not)
    draining: bool = False      # the broker is shutting down: it refuses new work, finishes running tasks
    rag_ready: bool = False     # the RAG worker is registered (`workers_ready` counts model instances only)


class Refused(_Msg):
    """A request the broker will not do; `code` is the API's stable error code."""

    req: int
    code: str
    message: str


# --------------------------------------------- broker <-> workers (back ROUTER)


class Ready(_Msg):
    """A worker joins, or rejoins (it reconnected, or the broker restarted). Slots are
    not credit yet. `running` names the tasks it is still running: they stay its own
    instead of being queued again (and run twice). `model` is the service it serves
    (a model id); `reserved` of its slots take only critical and high work."""

    worker: str
    model: str
    slots: int
    endpoint: str
    version: int = PROTOCOL_VERSION
    running: list[str] = []
    reserved: int = 0
    gpu: int = -1      # the GPU index it is pinned to; -1: CPU only
    starts: int = 1    # times this instance has started since the appliance came up


class Stopping(_Msg):
    """The worker is shutting down: it takes no new work (its credit is void) and
    finishes what it runs within DRAIN_GRACE_S; whatever still runs then is aborted
    and requeued when its Disconnect follows."""


class Credit(_Msg):
    """The worker can take `n` more tasks; the broker never sends more than it got."""

    n: int


class Dispatch(_Msg):
    task_id: str
    spec: TaskSpec
    deadline: float
    tenant: str = ""  # whose task: the RAG worker searches that tenant's documents only


class Done(_Msg):
    task_id: str
    result: TaskResult | None = None
    error: TaskError | None = None


class Abort(_Msg):
    """Stop a running task now (its llama.cpp request is closed, freeing the slot)."""

    task_id: str
    reason: Literal["cancelled", "timeout", "preempted"]


class Tokens(_Msg):
    """Generated text as it comes: worker -> broker, then broker -> subscribers (PUB).

    `seq` counts a task's Tokens messages from 1; pieces are coalesced (about every
    TOKEN_FLUSH_S) so a fast model does not send a message per token."""

    task_id: str
    seq: int
    text: str


class Final(_Msg):
    """broker -> subscribers (PUB): the task reached a final state."""

    task: TaskRecord


class Requeued(_Msg):
    """broker -> subscribers (PUB): a running task lost its instance (or was preempted)
    and waits to run again from the start: text streamed so far is void."""

    task_id: str
    attempts: int
    reason: str


class Heartbeat(_Msg):
    pass


class Disconnect(_Msg):
    pass


# ------------------------------------------------------ gpumon -> all (PUB)


class GpuProcess(Struct, omit_defaults=True):
    """A process holding memory on a GPU (NVML's compute processes)."""

    pid: int                        # as NVML sees it: the host's PID namespace
    memory_mb: float | None = None  # None: NVML does not say (no permission, MIG)
    instance: str = ""              # the appliance instance it belongs to (launcher or child); "": another


class GpuReading(Struct, omit_defaults=True):
    """One GPU's readings. Fields after `utilization_pct` were added later, all with
    defaults, so older messages still decode; None (absent on the wire) is what NVML
    cannot give on that card, never a guess."""

    index: int
    name: str
    memory_total_mb: float
    memory_used_mb: float           # allocated, without the driver's reservation (NVML's v2 memory query)
    temperature_c: float            # 0 when the card has no readable sensor
    utilization_pct: float          # 0 when NVML cannot say (e.g. MIG mode)
    uuid: str = ""
    memory_reserved_mb: float | None = None  # held by the driver; total = used + reserved + free
    memory_free_mb: float | None = None
    memory_utilization_pct: float | None = None
    temperature_slowdown_c: float | None = None  # the card's own thresholds
    temperature_shutdown_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None  # enforced
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    throttle_reasons: list[str] | None = None  # clock-event reasons (appliance/gpu/reasons.py); []: none
    throttle_thermal: bool | None = None   # sw_thermal or hw_thermal
    throttle_power: bool | None = None     # sw_power_cap or hw_power_brake
    throttle_hardware: bool | None = None  # hw_slowdown, hw_thermal or hw_power_brake
    processes: list[GpuProcess] | None = None  # None: NVML cannot list them; []: none


class Telemetry(_Msg):
    ts: float
    source: Literal["nvml", "samples", "none"]
    cpu_only: bool
    reason: str
    gpus: list[GpuReading]


TELEMETRY_TOPIC = b"gpu"
TOKEN_FLUSH_S = 0.02

# Events PUB (broker): two frames, the task id (ascii, the topic) and the message.
TaskEvent = Union[Tokens, Final, Requeued]

FrontRequest = Union[Submit, SubmitBatch, Query, Cancel, Ping, GetStats, GetGpu]
FrontReply = Union[Accepted, BatchAccepted, TaskInfo, Pong, Stats, Refused, GpuStatus]
WorkerToBroker = Union[Ready, Credit, Done, Tokens, Heartbeat, Disconnect, Stopping]
BrokerToWorker = Union[Dispatch, Abort, Heartbeat, Disconnect]

encode = msgspec.msgpack.Encoder().encode
front_request = msgspec.msgpack.Decoder(FrontRequest)
front_reply = msgspec.msgpack.Decoder(FrontReply)
worker_to_broker = msgspec.msgpack.Decoder(WorkerToBroker)
broker_to_worker = msgspec.msgpack.Decoder(BrokerToWorker)
telemetry = msgspec.msgpack.Decoder(Telemetry)
task_event = msgspec.msgpack.Decoder(TaskEvent)
