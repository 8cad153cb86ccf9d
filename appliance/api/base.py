"""What every resource shares: body reading, the broker client, ids and owners."""
from __future__ import annotations

import math
import re
import uuid
from typing import NamedTuple

import falcon
import msgspec

from .. import protocol as P
from .. import instances
from ..config import ConfigError, Settings
from ..grammar import SchemaError, compile_schema
from ..broker_client import BrokerClient, get_client
from .errors import ApiError, from_validation_error, invalid_field
from .follow import follow

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")

class Owner(NamedTuple):
    """Whose tasks a caller may see: its tenant's, or every tenant's (an admin)."""

    tenant: str
    all_tenants: bool


class Api:
    """Shared plumbing of the resources. Broker calls go through the typed client
    (`broker()`); its refusals become HTTP errors in one place (errors.py)."""

    def __init__(self, settings: Settings):
        self.s = settings

    def broker(self) -> BrokerClient:
        return get_client(self.s.broker_front, self.s.broker_timeout_s, self.s.broker_events)

    def instances(self) -> list[instances.Instance]:
        """The instances file as it is now; a broken edit is a 503 that says so, not a crash."""
        try:
            return instances.load(self.s)
        except ConfigError as exc:
            raise ApiError(503, "instances_file_invalid", str(exc.code), headers={"Retry-After": "5"}) from None

    def read_bytes(self, req: falcon.Request) -> bytes:
        """The body, at most MAX_BODY_BYTES (413 beyond, before reading it all)."""
        length = req.content_length
        limit = self.s.max_body_bytes
        if length is not None and length > limit:
            raise ApiError(413, "body_too_large", f"body is {length} bytes; the limit is {limit}",
                           {"limit": limit})
        body = req.bounded_stream.read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes", {"limit": limit})
        return body

    def read_json(self, req: falcon.Request, type_):
        body = self.read_bytes(req)
        if not body:
            raise ApiError(400, "malformed_json", "request body is empty; expected a JSON object")
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.ValidationError as exc:
            if "got `float`" not in str(exc) and "Expected `int` <= 9223372036854775807" not in str(exc):
                raise from_validation_error(exc) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
        # JSON Schema counts 1.0 as an integer, and so does the OpenAPI document; msgspec
        # does not. And a JSON integer past 64 bits is a valid `number` where a field takes
        # either. Only on this (rare) path: integral floats become ints, integers past 64
        # bits floats, then decode again.
        try:
            return msgspec.convert(_map_numbers(msgspec.json.decode(body), _json_number), type_)
        except msgspec.ValidationError as exc:
            raise from_validation_error(exc) from None

    def check_spec(self, spec: P.TaskSpec, prefix: str = "") -> None:
        """The configured bounds, and for `extract` a schema that is a JSON Schema.

        The grammar made here is cached by the schema (grammar.compile_schema), so the
        launcher's conversion of a schema seen before costs a dictionary lookup."""
        problem = P.check_bounds(spec, self.s.task_timeout_max_s, self.s.max_prompt_chars, self.s.max_tokens_limit)
        if problem is not None:
            raise invalid_field(prefix + problem[0], problem[1])
        if isinstance(spec, P.ExtractTask):
            try:
                compile_schema(spec.json_schema)
            except SchemaError as exc:
                raise invalid_field(prefix + "json_schema", str(exc)) from None
            spec.json_schema = _map_numbers(spec.json_schema, _wire_safe)

    @staticmethod
    def check_rag_scope(req: falcon.Request, spec: P.TaskSpec) -> None:
        """A rag_answer reads the caller's documents: it needs `rag:read` besides `tasks:write`."""
        if isinstance(spec, P.RagAnswerTask) and not req.context.principal.allows("rag:read"):
            raise ApiError(403, "insufficient_scope", "a rag_answer task needs the `rag:read` scope",
                           {"required": "rag:read"})

    @staticmethod
    def idempotency_key(req: falcon.Request) -> str | None:
        key = req.get_header("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 200:
            raise invalid_field("Idempotency-Key", "1 to 200 characters")
        return key

    @staticmethod
    def owner(req: falcon.Request) -> Owner:
        principal = req.context.principal
        return Owner(principal.tenant, principal.admin)

    def query(self, req: falcon.Request, task_id: str) -> P.TaskInfo:
        """The broker's view of a task, as this caller may see it (404 otherwise)."""
        return self.broker().query(self.task_id(task_id), *self.owner(req))

    def start(self, req: falcon.Request, spec: P.TaskSpec, pin: str | None = None):
        """Submit with an id of our own, already watched: no event can be missed.
        (task_id, Watch); the caller follows the watch, which closes it."""
        task_id = uuid.uuid4().hex
        req.context.audit_ids = [task_id]
        watch = self.broker().watch(task_id)
        try:
            self.broker().submit(spec, req.context.principal.tenant, task_id=task_id, pin=pin)
        except BaseException:
            watch.close()
            raise
        return task_id, watch

    def wait(self, req: falcon.Request, task_id: str, watch, deadline: float, what: str = "the task") -> P.TaskRecord:
        """The task's final record: 503 if following it was interrupted (it goes on),
        504 (and the task cancelled) past `deadline`."""
        owner = self.owner(req)
        for kind, value in follow(self, task_id, deadline, owner, watch, text=False):
            if kind == "final":
                return value
            if kind == "interrupted":
                raise ApiError(503, value.code, value.message, {"task_id": task_id}, headers={"Retry-After": "1"})
            if kind == "timeout":
                self.broker().cancel(task_id, *owner)
                raise ApiError(504, "timeout", f"{what} did not finish in time", {"task_id": task_id})
        raise AssertionError("follow() always ends with final, interrupted or timeout")

    @staticmethod
    def task_id(raw: str) -> str:
        if not _TASK_ID.match(raw):  # cannot exist: same answer as an unknown id
            raise ApiError(404, "not_found", "no such task")
        return raw


def _map_numbers(value, fn):
    """A decoded JSON value with `fn` applied to every number in it."""
    if isinstance(value, list):
        return [_map_numbers(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_numbers(v, fn) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fn(value)
    return value


def _json_number(x):
    """1.0 -> 1 (a float field still accepts the int); 2**70 -> 1.18e21 (an int field
    still refuses it, with its bound in the message)."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**63:
        return int(x)
    if isinstance(x, int) and not -(2**63) <= x < 2**63:
        return float(x) if abs(x) < 10**308 else math.copysign(math.inf, x)
    return x


def _wire_safe(x):
    """JSON allows integers of any size, MessagePack 64 bits: a larger one (in a schema,
    where only its magnitude can matter) travels as the nearest float."""
    if isinstance(x, int) and not -2**63 <= x < 2**64:
        return float(x) if abs(x) < 10**308 else math.copysign(math.inf, x)
    return x


def json_response(resp: falcon.Response, obj, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(obj)
