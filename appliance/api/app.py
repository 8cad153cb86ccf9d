"""The Falcon application: validate, turn a request into a protocol message, wait.

The API holds no queue state of its own; every answer about a task comes from the
broker. Request bodies decode straight into the protocol's Structs, so the HTTP
schema and the wire schema are the same object.
"""
from __future__ import annotations

import re

import falcon
import msgspec

from .. import protocol as P
from ..config import Settings
from .broker_client import BrokerUnavailable, get_client
from .errors import ApiError, from_validation_error, handle_http_error, handle_unexpected, invalid_field

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")

# broker refusal code -> (HTTP status, extra headers)
_REFUSAL_STATUS = {
    "not_found": 404,
    "already_final": 409,
    "invalid_field": 422,
    "batch_too_large": 422,
    "queue_full": 429,
    "storage_unavailable": 503,
}


class Api:
    """Shared plumbing of the resources: body reading, broker calls, error mapping."""

    def __init__(self, settings: Settings):
        self.s = settings

    def broker(self):
        return get_client(self.s.broker_front, self.s.broker_timeout_s)

    def call(self, make_msg):
        try:
            reply = self.broker().call(make_msg)
        except BrokerUnavailable as exc:
            raise ApiError(503, "broker_unavailable", str(exc), headers={"Retry-After": "1"}) from None
        if isinstance(reply, P.Refused):
            status = _REFUSAL_STATUS.get(reply.code, 400)
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            raise ApiError(status, reply.code, reply.message, headers=headers)
        return reply

    def read_json(self, req: falcon.Request, type_):
        length = req.content_length
        limit = self.s.max_body_bytes
        if length is not None and length > limit:
            raise ApiError(413, "body_too_large", f"body is {length} bytes; the limit is {limit}",
                           {"limit": limit})
        body = req.bounded_stream.read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes", {"limit": limit})
        if not body:
            raise ApiError(400, "malformed_json", "request body is empty; expected a JSON object")
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.ValidationError as exc:
            raise from_validation_error(exc) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None

    def check_spec(self, spec: P.TaskSpec, prefix: str = "") -> None:
        problem = spec.check(self.s.task_timeout_max_s)
        if problem is not None:
            raise invalid_field(prefix + problem[0], problem[1])

    @staticmethod
    def task_id(raw: str) -> str:
        if not _TASK_ID.match(raw):  # cannot exist: same answer as an unknown id
            raise ApiError(404, "not_found", "no such task")
        return raw


def _json(resp: falcon.Response, obj, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(obj)


class Healthz:
    def on_get(self, req, resp):
        _json(resp, {"status": "ok"})


class Readyz:
    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        pong = self.api.call(lambda r: P.Ping(r))
        body = {"broker": "ok", "workers_ready": pong.workers_ready, "queued": pong.queued,
                "running": pong.running, "gpu": pong.gpu_state}
        if pong.workers_ready < 1:
            raise ApiError(503, "no_instance_ready", "no model instance is registered with the broker",
                           body, headers={"Retry-After": "1"})
        _json(resp, {"status": "ready", **body})


class SubmitBatchBody(msgspec.Struct, forbid_unknown_fields=True):
    tasks: list[P.TaskSpec]


def _links(task_id: str) -> dict:
    return {"task_id": task_id, "status_url": f"/v1/async/status/{task_id}",
            "result_url": f"/v1/async/result/{task_id}"}


class Submit:
    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        spec = self.api.read_json(req, P.TaskSpec)
        self.api.check_spec(spec)
        accepted = self.api.call(lambda r: P.Submit(r, spec))
        _json(resp, {**_links(accepted.task_id), "state": accepted.state}, falcon.HTTP_202)


class SubmitBatch:
    """All or nothing: either every task is queued, or none is and the error says why."""

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        body = self.api.read_json(req, SubmitBatchBody)
        if not 1 <= len(body.tasks) <= self.api.s.max_batch:
            raise invalid_field("tasks", f"a batch holds 1 to {self.api.s.max_batch} tasks, not {len(body.tasks)}")
        for i, spec in enumerate(body.tasks):
            self.api.check_spec(spec, f"tasks[{i}].")
        accepted = self.api.call(lambda r: P.SubmitBatch(r, body.tasks))
        _json(resp, {"tasks": [{**_links(t), "state": "queued"} for t in accepted.task_ids]}, falcon.HTTP_202)


class Status:
    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, task_id):
        info = self.api.call(lambda r: P.Query(r, self.api.task_id(task_id)))
        rec = info.task
        rec.result = None  # status is small; the result endpoint carries the text
        body = msgspec.to_builtins(rec)
        if info.position is not None:
            body["position"] = info.position
        _json(resp, body)


class Result:
    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, task_id):
        info = self.api.call(lambda r: P.Query(r, self.api.task_id(task_id)))
        rec = info.task
        if rec.state not in P.FINAL_STATES:
            # Not done yet: 202 says "accepted, still processing"; poll again.
            _json(resp, {"task_id": rec.task_id, "state": rec.state}, falcon.HTTP_202)
            resp.set_header("Retry-After", "1")
            return
        if rec.result_expired:
            raise ApiError(410, "result_expired", f"results are kept {self.api.s.result_ttl_s:g}s after the task "
                           "ends; this one is gone", {"state": rec.state, "finished_at": rec.finished_at})
        _json(resp, {"task_id": rec.task_id, "state": rec.state, "result": rec.result, "error": rec.error,
                     "finished_at": rec.finished_at})


class Cancel:
    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp, task_id):
        info = self.api.call(lambda r: P.Cancel(r, self.api.task_id(task_id)))
        _json(resp, {"task_id": info.task.task_id, "state": info.task.state})


class Stats:
    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        stats = self.api.call(lambda r: P.GetStats(r))
        body = msgspec.structs.asdict(stats)  # array-like on the wire, an object here
        del body["req"]
        _json(resp, body)


class Health:
    """healthy / backing_up answer 200, stalled 503: a load balancer can act on it.

    The rule (computed by the broker, see README): stalled when tasks are queued and
    no instance is registered, or nothing was dispatched or finished for
    HEALTH_STALL_S; backing_up when the queue is at 80 % of QUEUE_MAX_SIZE or its
    oldest task has waited more than HEALTH_BACKLOG_WAIT_S; healthy otherwise.
    """

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        st = self.api.call(lambda r: P.GetStats(r))
        body = {"status": st.health, "reason": st.health_reason, "queued": st.queued, "running": st.running,
                "workers": len(st.workers), "oldest_queued_s": st.oldest_queued_s,
                "last_progress_s": st.last_progress_s}
        _json(resp, body, falcon.HTTP_503 if st.health == "stalled" else falcon.HTTP_200)


def create_app(settings: Settings) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    api = Api(settings)
    app.add_route("/healthz", Healthz())
    app.add_route("/readyz", Readyz(api))
    app.add_route("/v1/async/submit", Submit(api))
    app.add_route("/v1/async/submit-batch", SubmitBatch(api))
    app.add_route("/v1/async/status/{task_id}", Status(api))
    app.add_route("/v1/async/result/{task_id}", Result(api))
    app.add_route("/v1/async/cancel/{task_id}", Cancel(api))
    app.add_route("/v1/async/stats", Stats(api))
    app.add_route("/v1/async/health", Health(api))
    return app
