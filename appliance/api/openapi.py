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
from . import async_api, openai_api
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


class ModelList(Struct):
    object: str
    data: list[ModelCard]


_ERRORS = {
    "400": "malformed JSON",
    "404": "unknown id, route or model",
    "409": "the task is already final",
    "410": "the result expired",
    "401": "no token, or the token is invalid or expired (code says which)",
    "403": "the token lacks the scope this call needs (details.required)",
    "413": "body too large",
    "422": "a field is invalid (details.field names it)",
    "429": "queue full or rate limit exceeded (see Retry-After)",
    "503": "broker or model instance unavailable (see Retry-After)",
}


def _op(summary: str, ok: tuple[str, Any] | None, errors: str, body: Any = None, params: bool = False,
        extra: dict | None = None, sse: bool = False, secured: bool = True) -> tuple[dict, list]:
    types = []
    responses: dict[str, Any] = {}
    if ok is not None:
        status, typ = ok
        types.append(typ)
        responses[status] = {"description": "success", "content": {"application/json": {"schema": typ}}}
    if sse:
        responses["200"] = {"description": "server-sent events: `token` {text}, then `result` (the task's "
                            "record) or `error` {error}", "content": {"text/event-stream": {
                                "schema": {"type": "object"}}}}
    for code, typ in (extra or {}).items():
        types.append(typ)
        responses[code] = {"description": "see summary", "content": {"application/json": {"schema": typ}}}
    for code in dict.fromkeys(errors.split() + (["401", "403", "429"] if secured else [])):
        types.append(ErrorBody)
        responses[code] = {"description": _ERRORS[code], "content": {"application/json": {"schema": ErrorBody}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        types.append(body)
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = [{"name": "task_id", "in": "path", "required": True,
                             "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]
    return op, types


def build() -> dict:
    ops = {
        ("/healthz", "get"): _op("the API process is alive", ("200", Ok), "", secured=False),
        ("/readyz", "get"): _op("broker reachable and a model instance registered (loopback or token, see OPS_ENDPOINTS)",
                                ("200", Ready), "401 503", secured=False),
        ("/v1/async/submit", "post"): _op("queue a task", ("202", SubmitAccepted), "400 413 422 429 503",
                                          body=P.TaskSpec),
        ("/v1/async/submit-batch", "post"): _op("queue tasks, all or none", ("202", BatchAccepted),
                                                "400 413 422 429 503", body=async_api.SubmitBatchBody),
        ("/v1/async/status/{task_id}", "get"): _op("a task's state", ("200", TaskStatus), "404 503", params=True),
        ("/v1/async/result/{task_id}", "get"): _op("a task's result", ("200", TaskResultBody), "404 410 503",
                                                   params=True, extra={"202": Pending}),
        ("/v1/async/cancel/{task_id}", "post"): _op("cancel a queued or running task", ("200", Cancelled),
                                                    "404 409 503", params=True),
        ("/v1/async/stream/{task_id}", "get"): _op("token and result events (SSE)", None, "404 503", params=True,
                                                   sse=True),
        ("/v1/async/stats", "get"): _op("queue statistics", ("200", StatsBody), "503"),
        ("/v1/async/health", "get"): _op("queue health (stalled: 503)", ("200", HealthBody), "",
                                         extra={"503": HealthBody}),
        ("/v1/chat/completions", "post"): _op("OpenAI chat completion", ("200", dict[str, Any]),
                                              "400 404 413 422 429 503", body=openai_api.ChatRequest),
        ("/v1/completions", "post"): _op("OpenAI completion", ("200", dict[str, Any]), "400 404 413 422 429 503",
                                         body=openai_api.CompletionRequest),
        ("/v1/embeddings", "post"): _op("OpenAI embeddings", ("200", dict[str, Any]), "400 404 413 422 429 503",
                                        body=openai_api.EmbeddingRequest),
        ("/v1/models", "get"): _op("served models", ("200", ModelList), "503"),
    }
    all_types = [t for _, types in ops.values() for t in types]
    schemas, components = msgspec.json.schema_components(all_types, ref_template="#/components/schemas/{name}")
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


class OpenApi:
    auth = PUBLIC

    def __init__(self) -> None:
        self.body = msgspec.json.encode(build())

    def on_get(self, req, resp):
        resp.content_type = "application/json"
        resp.data = self.body
