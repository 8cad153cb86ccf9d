"""GET /openapi.json: an OpenAPI 3.1 document generated from the msgspec types.

Request bodies are the very Structs the resources decode into (protocol.TaskSpec,
the OpenAI request types); responses are the Structs below, which mirror what the
resources encode. Nothing is hand-kept twice: a field added to a Struct shows up here.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from .. import protocol as P
from .. import instances
from ..config import ConfigError, Settings
from . import async_api, gpu_api, instances_api, openai_api, rag_api
from .middleware import PUBLIC


class ErrorDetail(Struct):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(Struct):
    error: ErrorDetail


class SubmitAccepted(Struct):
    task_id: str
    state: P.TaskState
    status_url: str
    result_url: str
    stream_url: str


class BatchItem(Struct):
    task_id: str
    state: P.TaskState
    status_url: str
    result_url: str


class BatchAccepted(Struct):
    tasks: list[BatchItem]


class TaskStatus(Struct, omit_defaults=True):
    task_id: str
    state: P.TaskState
    type: str
    priority: P.Priority
    created_at: float
    tenant: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: P.TaskError | None = None
    result_expired: bool = False
    model: str = ""
    attempts: int = 0            # times it was dispatched (2: it ran again after its instance or box was lost)
    box: str | None = None       # the box it runs or ran on (several boxes on one queue)
    position: int | None = None
    text_so_far: str | None = None


class TaskResultBody(Struct):
    task_id: str
    state: P.TaskState
    result: P.TaskResult | None
    error: P.TaskError | None
    finished_at: float | None


class Pending(Struct):
    task_id: str
    state: P.TaskState


class Cancelled(Struct):
    task_id: str
    state: P.TaskState


class HealthBody(Struct):
    status: Literal["healthy", "backing_up", "stalled"]
    reason: str
    queued: int
    running: int
    workers: int
    oldest_queued_s: float
    last_progress_s: float


class StatsBody(Struct):
    depth: dict[str, int]
    queued: int
    running: int
    max_size: int
    workers: list[P.WorkerStats]
    dispatch_p50_ms: float
    dispatch_p95_ms: float
    dispatch_p99_ms: float
    completed_per_min: float
    finished: dict[str, int]
    oldest_queued_s: float
    last_progress_s: float
    health: Literal["healthy", "backing_up", "stalled"]
    health_reason: str
    replies_deferred: int
    replies_undeliverable: int
    workers_dropped: int
    box: str = ""              # several boxes on one queue: this box's name
    boxes: list[str] = []      # the boxes that renewed their leases lately
    shared_queued: int = 0     # tasks in the shared queue that no box holds yet


class InstanceRestarted(Struct):
    name: str
    state: str


class Ok(Struct):
    status: str


class Ready(Struct):
    status: str
    broker: str
    workers_ready: int
    queued: int
    running: int
    gpu: str


class ModelCard(Struct):
    id: str
    object: str
    created: int
    owned_by: str
    state: Literal["ready", "unavailable"]  # an instance of it is registered, or none is (tasks queue)


class ModelList(Struct):
    object: str
    data: list[ModelCard]


_ERRORS = {
    "400": "malformed JSON",
    "404": "unknown id, route or model",
    "409": "the task is already final (a restart: supervisord refused); a search: the index was built by another embedder",
    "410": "the result expired",
    "401": "no token, or the token is invalid or expired (code says which)",
    "403": "the token lacks the scope this call needs (details.required)",
    "413": "body too large",
    "422": "a field is invalid (details.field names it)",
    "429": "queue full or rate limit exceeded (see Retry-After)",
    "502": "the task failed in the model (error.details.reason says why)",
    "503": "broker or model instance unavailable (see Retry-After)",
    "504": "the task did not finish within its timeout",
}

_TASK_ID = {"name": "task_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
_PRIORITY = {"name": "X-Priority", "in": "header", "required": False,
             "description": "the task's priority (default normal)", "schema": {"enum": list(P.PRIORITIES)}}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "description": "the same key (per tenant) gives the same task while its record is kept",
                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
# Operations that take a task id, and the links that lead to them from a submit's answer.
_INSTANCE = {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,31}$"}}
_Q_MODEL = {"name": "model", "in": "query", "required": False, "description": "a configured model id (default: "
            "the first instance's)", "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
_GPU_QUERY = (
    _Q_MODEL,
    {"name": "n_ctx", "in": "query", "required": False, "description": "total context (default: the instance's)",
     "schema": {"type": "integer", "minimum": 1, "maximum": 4194304}},
    {"name": "n_parallel", "in": "query", "required": False, "description": "slots (default: the instance's)",
     "schema": {"type": "integer", "minimum": 1, "maximum": 256}},
    {"name": "kv_type", "in": "query", "required": False, "schema": {"enum": ["f32", "f16", "bf16", "q8_0", "q4_0",
                                                                             "q4_1", "q5_0", "q5_1", "iq4_nl"]}},
    {"name": "gpu_layers", "in": "query", "required": False, "description": "layers offloaded (default: the "
     "instance's; 999: all)", "schema": {"type": "integer", "minimum": 0, "maximum": 100000}},
)
_GPU_SIZE = {"name": "gpu_memory_mb", "in": "query", "required": False, "description": "plan for one GPU of this "
             "size instead of the GPUs seen", "schema": {"type": "integer", "minimum": 256, "maximum": 10000000}}
_DOC_ID = {"name": "document_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
_PAGE = ({"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                         "maximum": 1000}},
         {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}})
_BY_ID = {"getTaskStatus": "status", "getTaskResult": "result", "streamTask": "stream", "cancelTask": "cancel"}


# One server-sent event as a client parses it; `data` is a JSON document (or `[DONE]`).
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}


def _links(pointer: str) -> dict:
    """OpenAPI links from a submit's task id to every operation that takes one, so that a
    stateful client (schemathesis) follows real tasks instead of guessing ids."""
    return {name: {"operationId": op, "parameters": {"task_id": f"$response.body#{pointer}"}}
            for op, name in _BY_ID.items()}


def _op(op_id: str, summary: str, ok: tuple[str, Any] | None, errors: str, body: Any = None,
        params: tuple[dict, ...] = (), extra: dict | None = None, sse: bool = False, secured: bool = True,
        links: dict | None = None) -> tuple[dict, list]:
    types = []
    responses: dict[str, Any] = {}
    if ok is not None:
        status, typ = ok
        types.append(typ)
        responses[status] = {"description": "success", "content": {"application/json": {"schema": typ}}}
        if links:
            responses[status]["links"] = links
    if sse and ok is not None:  # an OpenAI call: JSON, or SSE chunks with `stream: true`
        responses[ok[0]]["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
    elif sse:
        responses["200"] = {"description": "server-sent events: `token` {text}, then `result` (the task's "
                            "record) or `error` {error}", "content": {"text/event-stream": {"schema": _SSE_EVENT}}}
    for code, typ in (extra or {}).items():
        types.append(typ)
        responses[code] = {"description": "see summary", "content": {"application/json": {"schema": typ}}}
    for code in dict.fromkeys(errors.split() + (["401", "403", "429"] if secured else [])):
        types.append(ErrorBody)
        responses[code] = {"description": _ERRORS[code], "content": {"application/json": {"schema": ErrorBody}}}
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if body is not None:
        types.append(body)
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = list(params)
    return op, types


_SYNC_ERRORS = "400 404 409 413 422 429 502 503 504"  # an OpenAI call waits for its task's end


def build(settings: Settings) -> dict:
    ops = {
        ("/healthz", "get"): _op("healthz", "the API process is alive", ("200", Ok), "", secured=False),
        ("/readyz", "get"): _op("readyz", "broker reachable and a model instance registered (loopback or token, "
                                "see OPS_ENDPOINTS)", ("200", Ready), "401 503", secured=False),
        ("/v1/async/submit", "post"): _op("submitTask", "queue a task", ("202", SubmitAccepted),
                                          "400 404 413 422 429 503", body=P.ClientTaskSpec, params=(_IDEMPOTENCY,),
                                          links=_links("/task_id")),
        ("/v1/async/submit-batch", "post"): _op("submitBatch", "queue tasks, all or none", ("202", BatchAccepted),
                                                "400 404 413 422 429 503", body=async_api.SubmitBatchBody,
                                                links=_links("/tasks/0/task_id")),
        ("/v1/async/status/{task_id}", "get"): _op("getTaskStatus", "a task's state", ("200", TaskStatus),
                                                   "404 503", params=(_TASK_ID,)),
        ("/v1/async/result/{task_id}", "get"): _op("getTaskResult", "a task's result", ("200", TaskResultBody),
                                                   "404 410 503", params=(_TASK_ID,), extra={"202": Pending}),
        ("/v1/async/cancel/{task_id}", "post"): _op("cancelTask", "cancel a queued or running task",
                                                    ("200", Cancelled), "404 409 503", params=(_TASK_ID,)),
        ("/v1/async/stream/{task_id}", "get"): _op("streamTask", "token and result events (SSE)", None, "404 503",
                                                   params=(_TASK_ID,), sse=True),
        ("/v1/async/stats", "get"): _op("getStats", "queue statistics", ("200", StatsBody), "503"),
        ("/v1/async/health", "get"): _op("getHealth", "queue health (stalled: 503)", ("200", HealthBody), "",
                                         extra={"503": HealthBody}),
        ("/v1/chat/completions", "post"): _op("createChatCompletion", "OpenAI chat completion",
                                              ("200", dict[str, Any]), _SYNC_ERRORS, body=openai_api.ChatRequest,
                                              params=(_PRIORITY,), sse=True),
        ("/v1/completions", "post"): _op("createCompletion", "OpenAI completion", ("200", dict[str, Any]),
                                         _SYNC_ERRORS, body=openai_api.CompletionRequest, params=(_PRIORITY,),
                                         sse=True),
        ("/v1/embeddings", "post"): _op("createEmbedding", "OpenAI embeddings", ("200", dict[str, Any]),
                                        _SYNC_ERRORS, body=openai_api.EmbeddingRequest, params=(_PRIORITY,)),
        ("/v1/models", "get"): _op("listModels", "the configured models and whether an instance of each is up",
                                   ("200", ModelList), "503"),
        ("/v1/instances", "get"): _op("listInstances", "the model instances: configured, registered, process "
                                      "state, slots, restarts, GPU", ("200", instances_api.InstanceList), "503"),
        ("/v1/instances/{name}/restart", "post"): _op(
            "restartInstance", "restart one instance through supervisord (admin)", ("200", InstanceRestarted),
            "404 409 503", params=(_INSTANCE,)),
        ("/v1/gpu/status", "get"): _op("getGpuStatus", "NVML readings per GPU, throttle state and reason, instances "
                                       "per GPU (gpu:read)", ("200", dict[str, Any]), "503"),
        ("/v1/gpu/memory-forecast", "get"): _op(
            "getMemoryForecast", "memory a model needs (weights, KV cache, compute, CUDA context), from its GGUF "
            "header, and whether it fits each GPU (gpu:read)", ("200", dict[str, Any]), "404 422 503",
            params=_GPU_QUERY),
        ("/v1/gpu/models-optimal", "get"): _op(
            "getModelsOptimal", "per model and GPU: the largest context and slot count that fit, or why none does "
            "(gpu:read)", ("200", dict[str, Any]), "422 503", params=(_GPU_SIZE,)),
        ("/v1/gpu/rebalance", "post"): _op(
            "rebalanceGpus", "a placement plan; apply: true (admin) edits the instances file and restarts what moves",
            ("200", dict[str, Any]), "400 409 413 422 503", body=gpu_api.RebalanceBody),
        ("/v1/gpu/benchmark-model", "post"): _op(
            "benchmarkModel", "a short fixed generation on one instance at batch priority: llama.cpp's prompt and "
            "generation tokens/s (admin)", ("200", dict[str, Any]), "400 404 413 422 502 503 504",
            body=gpu_api.BenchmarkBody),
        ("/v1/rag/documents", "post"): _op(
            "addDocument", "index a document (rag:write): chunked, embedded and indexed by a batch-priority task "
            "whose status shows its progress; the same text again is the same document. Also accepts a "
            "text/plain or text/markdown upload with ?title=", ("202", rag_api.DocumentAccepted),
            "400 403 413 422 503", body=rag_api.DocumentBody),
        ("/v1/rag/documents", "get"): _op("listDocuments", "the documents this caller sees (rag:read)",
                                          ("200", dict[str, Any]), "400 503 504", params=_PAGE),
        ("/v1/rag/documents/{document_id}", "get"): _op("getDocument", "one document (rag:read)",
                                                        ("200", dict[str, Any]), "404 503 504", params=(_DOC_ID,)),
        ("/v1/rag/documents/{document_id}", "delete"): _op(
            "deleteDocument", "delete a document and its chunks (rag:write; site-wide ones: admin)",
            ("200", dict[str, Any]), "404 503 504", params=(_DOC_ID,)),
        ("/v1/rag/search", "post"): _op(
            "searchDocuments", "the chunks that best match a query: vector, keyword (BM25) or hybrid (both, "
            "fused by reciprocal rank) (rag:read)", ("200", dict[str, Any]), "400 409 413 422 503 504",
            body=rag_api.SearchBody),
    }
    all_types = [t for _, types in ops.values() for t in types]
    schemas, components = msgspec.json.schema_components(all_types, ref_template="#/components/schemas/{name}")
    _tagged_unions_as_one_of(schemas)
    _tagged_unions_as_one_of(components)
    _configured_bounds(components, settings)
    by_type = dict(zip(map(id, all_types), schemas))
    paths: dict[str, dict] = {}
    for (path, method), (op, _) in ops.items():
        for resp in op["responses"].values():
            for media in resp.get("content", {}).values():
                if not isinstance(media["schema"], dict):
                    media["schema"] = by_type[id(media["schema"])]
        if "requestBody" in op:
            media = op["requestBody"]["content"]["application/json"]
            media["schema"] = by_type[id(media["schema"])]
        if path.startswith("/v1/"):
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Clinical LLM inference appliance", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "`appliance token --sub NAME --scopes tasks:read,tasks:write`"}}},
    }


def _tagged_unions_as_one_of(node) -> None:
    """msgspec writes a tagged union as anyOf + discriminator; exactly one member can
    match a tag, and OpenAPI tools expect oneOf beside a discriminator."""
    if isinstance(node, dict):
        if "discriminator" in node and "anyOf" in node:
            node["oneOf"] = node.pop("anyOf")
        for value in node.values():
            _tagged_unions_as_one_of(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _tagged_unions_as_one_of(value)


def _configured_bounds(components: dict, s: Settings) -> None:
    """What this appliance's settings allow, where a Struct's static bound is wider:
    the document must not promise what validation then refuses (TASK_TIMEOUT_MAX_S,
    MAX_PROMPT_CHARS; the latter bounds the sum of a task's text, stated per field here;
    the models of the instances file)."""
    try:
        models = instances.models(instances.load(s))
    except ConfigError:  # a broken instances file: the document cannot name the models
        models = []
    if models:
        for name in ("ChatTask", "CompleteTask", "EmbedTask", "ExtractTask", "RagAnswerTask"):
            option = components[name]["properties"]["model"]["anyOf"][0]
            option["enum"] = models
        for name in ("ChatRequest", "CompletionRequest", "EmbeddingRequest"):
            components[name]["properties"]["model"] = {"enum": models, "description": "a configured model "
                                                       "(GET /v1/models); another one is 404 model_not_found"}
    chars = s.max_prompt_chars
    components["SubmitBatchBody"]["properties"]["tasks"]["maxItems"] = s.max_batch
    for name in ("ChatTask", "CompleteTask", "EmbedTask", "ExtractTask", "RagAnswerTask"):
        components[name]["properties"]["timeout_s"]["anyOf"][0]["maximum"] = s.task_timeout_max_s
    for name, field in (("ChatTask", "max_tokens"), ("CompleteTask", "max_tokens"), ("ExtractTask", "max_tokens"),
                        ("RagAnswerTask", "max_tokens"),
                        ("ChatRequest", "max_tokens"), ("ChatRequest", "max_completion_tokens"),
                        ("CompletionRequest", "max_tokens")):
        prop = components[name]["properties"][field]
        for option in prop.get("anyOf", [prop]):
            if option.get("type") == "integer":
                option["maximum"] = s.max_tokens_limit

    def cap(schema: dict) -> None:
        schema["maxLength"] = min(schema.get("maxLength", chars), chars)

    cap(components["ChatMessage"]["properties"]["content"])
    cap(components["CompleteTask"]["properties"]["prompt"])
    cap(components["RagAnswerTask"]["properties"]["question"])
    cap(components["SearchBody"]["properties"]["query"])
    components["DocumentBody"]["properties"]["text"]["maxLength"] = s.rag_max_doc_chars
    cap(components["EmbedTask"]["properties"]["texts"]["items"])
    cap(components["CompletionRequest"]["properties"]["prompt"])
    cap(components["TextPart"]["properties"]["text"])
    for option in components["OAMessage"]["properties"]["content"]["anyOf"]:
        if option.get("type") == "string":
            cap(option)
    for option in components["EmbeddingRequest"]["properties"]["input"]["anyOf"]:
        cap(option["items"] if option.get("type") == "array" else option)


class OpenApi:
    """Built once, and again when the instances file changes (its models are in it)."""

    auth = PUBLIC

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._stamp: float | None = -1.0
        self.body = b""

    def on_get(self, req, resp):
        path = instances.instances_path(self.s)
        stamp = path.stat().st_mtime if path.is_file() else None
        if stamp != self._stamp:
            self.body, self._stamp = msgspec.json.encode(build(self.s)), stamp
        resp.content_type = "application/json"
        resp.data = self.body
