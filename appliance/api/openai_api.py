"""OpenAI-compatible endpoints, so that existing clients work unchanged.

Every call becomes a task in the same broker queue as the async API (no side door
to llama.cpp): priority comes from the `X-Priority` header (default normal). The API
proposes the task id, subscribes to its events, submits, and answers when the task
ends — or streams OpenAI chunks as SSE, ending with `data: [DONE]`.

Unknown request fields are ignored, as OpenAI clients send many (top_p, user, ...);
fields we cannot honour (n > 1, tools) are refused with 422, never silently dropped.
"""
from __future__ import annotations

import base64
import struct
import threading
import time
from typing import Annotated, Any, Literal

import falcon
from msgspec import Meta, Struct

from .. import protocol as P
from .base import Api, json_response
from .errors import ApiError, invalid_field
from .follow import follow
from .sse import KEEPALIVE, sse_event, sse_response

MODELS_CACHE_S = 1.0
DEFAULT_TIMEOUT_S = 60.0  # an OpenAI call's task timeout (no field for it in OpenAI's API)


class TextPart(Struct):
    """A content part; only text parts exist here (no images, no audio)."""

    type: Literal["text"]
    text: str


class OAMessage(Struct):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(Struct):
    include_usage: bool = False


class JsonSchemaFormat(Struct):
    schema: Annotated[dict[str, Any], Meta(min_length=1)]
    name: str = "output"
    strict: bool | None = None
    description: str | None = None


class TextFormat(Struct, tag_field="type", tag="text"):
    pass


class JsonSchemaResponse(Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaFormat


class ChatRequest(Struct):
    model: str
    messages: Annotated[list[OAMessage], Meta(min_length=1, max_length=1000)]
    max_tokens: Annotated[int, Meta(ge=1, le=32768)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=32768)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: TextFormat | JsonSchemaResponse | None = None
    session_id: Annotated[str, Meta(min_length=1, max_length=200, description=(
        "an extension: the conversation's id, so that its turns go to the instance holding its prompt in "
        "cache (without it, the leading messages identify the conversation)"))] | None = None
    tools: Annotated[list[Any], Meta(max_length=0, description="tool calling is not supported")] | None = None


class CompletionRequest(Struct):
    model: str
    prompt: Annotated[str, Meta(max_length=1_000_000)]
    max_tokens: Annotated[int, Meta(ge=1, le=32768, description="default 16 (OpenAI's), or MAX_TOKENS_LIMIT "
                                                               "if that is less")] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(Struct):
    model: str
    input: str | Annotated[list[str], Meta(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"


def _text_of(m: OAMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


# Failed tasks in a synchronous call: error code -> HTTP status
# Failed tasks in a synchronous call: error code -> (HTTP status, the code OpenAI clients know)
_FAILURE_STATUS = {
    "timeout": (504, "timeout"),
    "deadline": (503, "deadline"),
    "cancelled": (409, "cancelled"),
    "context_exceeded": (400, "context_length_exceeded"),  # the prompt does not fit the model's context
    "llama_rejected": (400, "invalid_request"),             # llama.cpp refused the request itself
}


class OpenAI:
    """Shared by the endpoints: model check, priority, running a task to its end."""

    def __init__(self, api: Api):
        self.api = api
        self._models: tuple[float, list[str], list[str]] = (0.0, [], [])
        self._lock = threading.Lock()

    def models(self) -> tuple[list[str], list[str]]:
        """(configured model ids, those with a registered instance), at most MODELS_CACHE_S old."""
        with self._lock:
            at, configured, served = self._models
        if time.monotonic() - at > MODELS_CACHE_S:
            pong = self.api.broker().ping()
            configured, served = pong.configured, pong.models
            with self._lock:
                self._models = (time.monotonic(), configured, served)
        return configured, served

    def check_model(self, model: str) -> None:
        """A model no instance is configured for is 404; a configured one whose instances
        are all down queues (like the async API), and health says so."""
        configured, _ = self.models()
        if model not in configured:
            raise ApiError(404, "model_not_found", f"no model {model!r} is configured here",
                           {"available": configured})

    @staticmethod
    def priority(req: falcon.Request) -> str:
        value = req.get_header("X-Priority")
        if value is None:
            return "normal"
        if value not in P.LEVEL:
            raise invalid_field("X-Priority", f"one of {', '.join(P.PRIORITIES)}")
        return value

    def task_fields(self, req: falcon.Request) -> dict:
        """Priority from X-Priority; the timeout a task gets by default, within TASK_TIMEOUT_MAX_S."""
        return {"priority": self.priority(req), "timeout_s": min(DEFAULT_TIMEOUT_S, self.api.s.task_timeout_max_s)}

    def start(self, req: falcon.Request, spec: P.TaskSpec):
        self.api.check_spec(spec)
        return self.api.start(req, spec)

    def deadline(self, spec: P.TaskSpec) -> float:
        return time.time() + spec.timeout_s + 5

    def wait(self, req: falcon.Request, spec: P.TaskSpec) -> P.TaskRecord:
        task_id, watch = self.start(req, spec)
        return self.check_final(self.api.wait(req, task_id, watch, self.deadline(spec)))

    @staticmethod
    def check_final(rec: P.TaskRecord) -> P.TaskRecord:
        """The record to answer with, or the HTTP error a failed task is.

        Structured output that does not validate is answered as OpenAI-compatible
        servers do, 200 with the text and its finish_reason (`length` when max_tokens cut
        it), not as an error; the async API reports it failed `extract_invalid`."""
        if rec.state == "completed":
            return rec
        err = rec.error or P.TaskError(rec.state, rec.state)
        if err.code == "extract_invalid" and rec.result is not None:
            return rec
        status, code = _FAILURE_STATUS.get(err.code, (502, "model_error"))
        raise ApiError(status, code, err.message, {"task_id": rec.task_id, "state": rec.state, "reason": err.code})

    def stream(self, req: falcon.Request, spec: P.TaskSpec, make_chunk, include_usage: bool):
        """SSE body: OpenAI chunks from `make_chunk(text=..., finish=...)`, then [DONE]."""
        task_id, watch = self.start(req, spec)
        owner = self.api.owner(req)

        def events():
            for kind, value in follow(self.api, task_id, self.deadline(spec), owner, watch):
                if kind == "text":
                    yield sse_event(make_chunk(task_id, text=value))
                elif kind == "idle":
                    yield KEEPALIVE
                elif kind == "interrupted":
                    yield sse_event({"error": {"code": value.code, "message": value.message, "type": "interrupted"}})
                elif kind == "final":
                    try:
                        rec = self.check_final(value)
                    except ApiError as exc:
                        yield sse_event({"error": {"code": exc.code, "message": exc.message, "type": "task_failed"}})
                        break
                    res = rec.result
                    yield sse_event(make_chunk(task_id, finish=res.finish_reason or "stop"))
                    if include_usage:
                        yield sse_event(make_chunk(task_id, usage=_usage(res)))
                else:
                    self.api.broker().cancel(task_id, *owner)
                    yield sse_event({"error": {"code": "timeout", "message": "the task did not finish in time",
                                               "type": "task_failed"}})
            yield b"data: [DONE]\n\n"
        return events()


def _usage(res: P.TaskResult) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _answer(oa: OpenAI, req, resp, spec: P.TaskSpec, model: str, stream: bool, include_usage: bool, chat: bool):
    """Run the task and answer as OpenAI does: a whole object, or SSE chunks.

    Chat and text completions differ only in names and in the shape of a choice.
    """
    prefix, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    if stream:
        def chunk(task_id, text=None, finish=None, usage=None):
            c = {"id": f"{prefix}-{task_id}", "object": f"{obj}.chunk" if chat else obj,
                 "created": int(time.time()), "model": model, "choices": []}
            if usage is not None:
                c["usage"] = usage
            elif chat:
                delta = {"role": "assistant", "content": text} if text is not None else {}
                c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                c["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
            return c
        sse_response(resp, oa.stream(req, spec, chunk, include_usage))
        return
    rec = oa.wait(req, spec)
    res = rec.result
    choice = {"index": 0, "message": {"role": "assistant", "content": res.text}} if chat else {
        "index": 0, "text": res.text}
    choice.update(finish_reason=res.finish_reason or "stop", logprobs=None)
    json_response(resp, {"id": f"{prefix}-{rec.task_id}", "object": obj, "created": int(rec.created_at),
                         "model": model, "choices": [choice], "usage": _usage(res)})


class ChatCompletions:
    new_work = True  # refused 503 shutting_down while the API drains
    auth = {"POST": "tasks:write"}

    def __init__(self, oa: OpenAI):
        self.oa = oa

    def on_post(self, req, resp):
        body = self.oa.api.read_json(req, ChatRequest)
        self.oa.check_model(body.model)
        messages = [P.ChatMessage(m.role, _text_of(m)) for m in body.messages]
        common = dict(model=body.model, messages=messages, temperature=body.temperature, seed=body.seed,
                      max_tokens=body.max_completion_tokens or body.max_tokens, session_id=body.session_id,
                      **self.oa.task_fields(req))  # max_tokens None: the broker's default within its bound
        if isinstance(body.response_format, JsonSchemaResponse):  # structured output: an extract task
            spec = P.ExtractTask(json_schema=body.response_format.json_schema.schema, **common)
        else:
            spec = P.ChatTask(**common)
        include = bool(body.stream_options and body.stream_options.include_usage)
        _answer(self.oa, req, resp, spec, body.model, body.stream, include, chat=True)


class Completions:
    new_work = True  # refused 503 shutting_down while the API drains
    auth = {"POST": "tasks:write"}

    def __init__(self, oa: OpenAI):
        self.oa = oa

    def on_post(self, req, resp):
        body = self.oa.api.read_json(req, CompletionRequest)
        self.oa.check_model(body.model)
        limit = self.oa.api.s.max_tokens_limit
        spec = P.CompleteTask(model=body.model, prompt=body.prompt, max_tokens=body.max_tokens or min(16, limit),
                              temperature=body.temperature, seed=body.seed, **self.oa.task_fields(req))
        include = bool(body.stream_options and body.stream_options.include_usage)
        _answer(self.oa, req, resp, spec, body.model, body.stream, include, chat=False)


class Embeddings:
    new_work = True  # refused 503 shutting_down while the API drains
    auth = {"POST": "tasks:write"}

    def __init__(self, oa: OpenAI):
        self.oa = oa

    def on_post(self, req, resp):
        body = self.oa.api.read_json(req, EmbeddingRequest)
        self.oa.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        spec = P.EmbedTask(model=body.model, texts=texts, **self.oa.task_fields(req))
        rec = self.oa.wait(req, spec)
        res = rec.result
        json_response(resp, {
            "object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                     for i, v in enumerate(res.embeddings or [])],
            "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens},
        })


def _encode(vector: list[float], fmt: str):
    """`base64` is what the openai client asks for by default: little-endian float32."""
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class Models:
    auth = {"GET": "tasks:read"}

    def __init__(self, oa: OpenAI):
        self.oa = oa

    def on_get(self, req, resp):
        configured, served = self.oa.models()
        json_response(resp, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "appliance",
             "state": "ready" if m in served else "unavailable"} for m in configured]})


def add_routes(app: falcon.App, api: Api) -> None:
    oa = OpenAI(api)
    app.add_route("/v1/chat/completions", ChatCompletions(oa))
    app.add_route("/v1/completions", Completions(oa))
    app.add_route("/v1/embeddings", Embeddings(oa))
    app.add_route("/v1/models", Models(oa))
