"""One task against llama.cpp: the request that runs it, and its outcome as a Done.

Every way a request can go wrong becomes a Done with a stable error code; nothing
here raises to the worker loop.
"""
from __future__ import annotations

import http.client
import json
import secrets
import time

import jsonschema
import msgspec
import referencing
import referencing.exceptions

from .. import protocol as P
from ..grammar import SchemaError, compile_schema
from .client import Aborted, LlamaClient, LlamaHTTPError


# llama.cpp's own defaults, sent explicitly so that a result can state what it ran with.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def sampling_for(spec: P.TaskSpec) -> P.Sampling | None:
    """Every sampling parameter of a generation, explicit: the client's, else llama.cpp's
    defaults, and a seed drawn here when the client gave none, so that the provenance
    of its result is enough to run it again."""
    if isinstance(spec, P.EmbedTask):
        return None
    temperature = spec.temperature if spec.temperature is not None else DEFAULT_SAMPLING["temperature"]
    seed = spec.seed if spec.seed is not None else secrets.randbits(31)
    return P.Sampling(temperature=temperature, top_k=DEFAULT_SAMPLING["top_k"], top_p=DEFAULT_SAMPLING["top_p"],
                      min_p=DEFAULT_SAMPLING["min_p"], seed=seed, max_tokens=spec.max_tokens or P.DEFAULT_MAX_TOKENS)


def request_for(spec: P.TaskSpec, sampling: P.Sampling | None = None) -> tuple[str, dict]:
    """The llama.cpp (OpenAI-style) request that runs this task. `cache_prompt` keeps the
    prompt's KV cache in the slot, so that the next turn of a conversation routed back
    here (prefix affinity) evaluates only what is new."""
    if isinstance(spec, P.EmbedTask):
        return "/v1/embeddings", {"input": spec.texts}
    sampling = sampling or sampling_for(spec)
    body: dict = {"max_tokens": sampling.max_tokens, "stream_options": {"include_usage": True}, "cache_prompt": True,
                  "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                  "min_p": sampling.min_p, "seed": sampling.seed}
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
        code = "context_exceeded" if exc.code == "exceed_context_size_error" else "llama_rejected"
        return P.Done(task_id, error=P.TaskError(code, str(exc)))
    return P.Done(task_id, error=P.TaskError("llama_unavailable", f"{type(exc).__name__}: {exc}"))


_REQUEST_ERRORS = (Aborted, TimeoutError, LlamaHTTPError, OSError, http.client.HTTPException, ValueError)


def run_task(client: LlamaClient, model: str, task_id: str, spec: P.TaskSpec, deadline: float,
             on_text=None, provenance: P.Provenance | None = None) -> P.Done:
    """One task against llama.cpp; every failure becomes a Done with an error code.

    `on_text(piece)` is called with each piece of generated text as it arrives.
    """
    if deadline - time.time() <= 0:
        return P.Done(task_id, error=P.TaskError("timeout", "deadline passed before the model started"))
    sampling = sampling_for(spec)
    try:
        path, body = request_for(spec, sampling)
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
        return P.Done(task_id, result=P.TaskResult(embeddings=vectors, model=model, provenance=provenance,
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
    try:
        timings = msgspec.convert(timings, P.Timings) if timings else None
    except msgspec.ValidationError as exc:
        return P.Done(task_id, error=P.TaskError("llama_bad_response", f"unexpected timings: {exc}"))
    result = P.TaskResult(
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        cached_tokens=timings.cache_n if timings else 0,
        model=model,
        timings=timings,
        provenance=msgspec.structs.replace(provenance, sampling=sampling) if provenance else None,
    )
    if isinstance(spec, P.ExtractTask):
        try:
            result.data = json.loads(text)
            validate_extract(result.data, spec.json_schema)
        except (ValueError, jsonschema.ValidationError, referencing.exceptions.Unresolvable) as exc:
            result.data = None  # the text stays: what the model produced, for the caller to see
            why = "cut off by max_tokens" if finish_reason == "length" else str(exc).splitlines()[0]
            return P.Done(task_id, result=result, error=P.TaskError(
                "extract_invalid", f"output is not valid against the schema: {why}"))
    return P.Done(task_id, result=result)
