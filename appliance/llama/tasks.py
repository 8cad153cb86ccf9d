"""One task against llama.cpp: the request that runs it, and its outcome as a Done.

Every way a request can go wrong becomes a Done with a stable error code; nothing
here raises to the worker loop.
"""
from __future__ import annotations

import http.client
import json
import time

import jsonschema
import msgspec
import referencing
import referencing.exceptions

from .. import protocol as P
from ..grammar import SchemaError, compile_schema
from .client import Aborted, LlamaClient, LlamaHTTPError


def request_for(spec: P.TaskSpec) -> tuple[str, dict]:
    """The llama.cpp (OpenAI-style) request that runs this task."""
    if isinstance(spec, P.EmbedTask):
        return "/v1/embeddings", {"input": spec.texts}
    body: dict = {"max_tokens": spec.max_tokens, "stream_options": {"include_usage": True}}
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.seed is not None:
        body["seed"] = spec.seed
    if isinstance(spec, P.CompleteTask):
        body["prompt"] = spec.prompt
        return "/v1/completions", body
    body["messages"] = [{"role": m.role, "content": m.content} for m in spec.messages]
    if isinstance(spec, P.ExtractTask):
        body["grammar"] = compile_schema(spec.json_schema)  # cached: a schema used again is not reconverted
    return "/v1/chat/completions", body


def validate_extract(data, schema: dict) -> None:
    """Raise jsonschema.ValidationError unless `data` is valid against `schema`.

    References resolve inside the schema only: a `$ref` to a URL is never fetched (no
    request leaves the box on a client's say-so) and fails as unresolvable."""
    jsonschema.Draft202012Validator(schema, registry=referencing.Registry()).validate(data)


def _failure(task_id: str, exc: BaseException, spec: P.TaskSpec) -> P.Done:
    """Every way a llama.cpp request can go wrong, as a Done with a stable code."""
    if isinstance(exc, Aborted):
        return P.Done(task_id, error=P.TaskError(str(exc), f"aborted ({exc}); llama.cpp request closed"))
    if isinstance(exc, TimeoutError):
        return P.Done(task_id, error=P.TaskError("timeout", f"did not finish within {spec.timeout_s:g}s"))
    if isinstance(exc, LlamaHTTPError):
        return P.Done(task_id, error=P.TaskError("llama_rejected", str(exc)))
    return P.Done(task_id, error=P.TaskError("llama_unavailable", f"{type(exc).__name__}: {exc}"))


_REQUEST_ERRORS = (Aborted, TimeoutError, LlamaHTTPError, OSError, http.client.HTTPException, ValueError)


def run_task(client: LlamaClient, model: str, task_id: str, spec: P.TaskSpec, deadline: float,
             on_text=None) -> P.Done:
    """One task against llama.cpp; every failure becomes a Done with an error code.

    `on_text(piece)` is called with each piece of generated text as it arrives.
    """
    if deadline - time.time() <= 0:
        return P.Done(task_id, error=P.TaskError("timeout", "deadline passed before the model started"))
    try:
        path, body = request_for(spec)
    except SchemaError as exc:  # the API checks schemas up front; a direct client may not have
        return P.Done(task_id, error=P.TaskError("invalid_schema", str(exc)))
    if isinstance(spec, P.EmbedTask):
        try:
            data = client.post_json(task_id, path, body, deadline)
        except _REQUEST_ERRORS as exc:
            return _failure(task_id, exc, spec)
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            vectors = [[float(v) for v in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            return P.Done(task_id, error=P.TaskError("llama_bad_response", f"unexpected answer shape: {exc}"))
        usage = data.get("usage") or {}
        return P.Done(task_id, result=P.TaskResult(embeddings=vectors, model=model,
                                                   prompt_tokens=usage.get("prompt_tokens", 0)))
    pieces: list[str] = []
    finish_reason, usage, timings = "", {}, None
    try:
        for event in client.stream(task_id, path, body, deadline):
            if "error" in event:
                err = event["error"] or {}
                return P.Done(task_id, error=P.TaskError(
                    "llama_rejected", f"{err.get('type', 'error')}: {err.get('message', '')}"))
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if spec.type != "complete" else choice.get("text")
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    except _REQUEST_ERRORS as exc:
        return _failure(task_id, exc, spec)
    text = "".join(pieces)
    data = None
    if isinstance(spec, P.ExtractTask):
        try:
            data = json.loads(text)
            validate_extract(data, spec.json_schema)
        except (ValueError, jsonschema.ValidationError, referencing.exceptions.Unresolvable) as exc:
            why = "cut off by max_tokens" if finish_reason == "length" else str(exc).splitlines()[0]
            return P.Done(task_id, error=P.TaskError("extract_invalid", f"output is not valid against the "
                                                     f"schema: {why}"))
    try:
        return P.Done(task_id, result=P.TaskResult(
            text=text,
            data=data,
            finish_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            model=model,
            timings=msgspec.convert(timings, P.Timings) if timings else None,
        ))
    except msgspec.ValidationError as exc:
        return P.Done(task_id, error=P.TaskError("llama_bad_response", f"unexpected timings: {exc}"))
