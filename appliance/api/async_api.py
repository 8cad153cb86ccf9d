"""The async task API: submit, batch, status, result, cancel, stream, stats, health."""
from __future__ import annotations

from typing import Annotated

import falcon
import msgspec
from msgspec import Meta

from .. import protocol as P
from .base import Api, json_response
from .errors import ApiError, invalid_field
from .follow import follow
from .sse import KEEPALIVE, sse_event, sse_response

WRITE = {"POST": "tasks:write"}
READ = {"GET": "tasks:read"}


class SubmitBatchBody(msgspec.Struct, forbid_unknown_fields=True):
    tasks: Annotated[list[P.ClientTaskSpec], Meta(min_length=1)]  # at most MAX_BATCH


def _links(task_id: str) -> dict:
    return {"task_id": task_id, "status_url": f"/v1/async/status/{task_id}",
            "result_url": f"/v1/async/result/{task_id}"}


class Submit:
    new_work = True  # refused 503 shutting_down while the API drains
    auth = WRITE

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        spec = self.api.read_json(req, P.ClientTaskSpec)
        self.api.check_spec(spec)
        self.api.check_rag_scope(req, spec)
        key = self.api.idempotency_key(req)
        tenant = req.context.principal.tenant
        accepted = self.api.broker().submit(spec, tenant, idempotency_key=key)
        req.context.audit_ids = [accepted.task_id]
        json_response(resp, {**_links(accepted.task_id), "state": accepted.state,
                             "stream_url": f"/v1/async/stream/{accepted.task_id}"}, falcon.HTTP_202)


class SubmitBatch:
    """All or nothing: either every task is queued, or none is and the error says why."""
    new_work = True  # refused 503 shutting_down while the API drains

    auth = WRITE

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        body = self.api.read_json(req, SubmitBatchBody)
        if not 1 <= len(body.tasks) <= self.api.s.max_batch:
            raise invalid_field("tasks", f"a batch holds 1 to {self.api.s.max_batch} tasks, not {len(body.tasks)}")
        for i, spec in enumerate(body.tasks):
            self.api.check_spec(spec, f"tasks[{i}].")
            self.api.check_rag_scope(req, spec)
        tenant = req.context.principal.tenant
        accepted = self.api.broker().submit_batch(body.tasks, tenant)
        req.context.audit_ids = accepted.task_ids
        json_response(resp, {"tasks": [{**_links(t), "state": "queued"} for t in accepted.task_ids]}, falcon.HTTP_202)


class Status:
    auth = READ

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, task_id):
        info = self.api.query(req, task_id)
        rec = info.task
        rec.result = None  # status is small; the result endpoint carries the text
        body = msgspec.to_builtins(rec)
        if info.position is not None:
            body["position"] = info.position
        if info.text_so_far is not None:
            body["text_so_far"] = info.text_so_far
            if rec.type == "rag_ingest":  # its text is progress lines: "indexed DONE/TOTAL"
                body["progress"] = _progress(info.text_so_far)
        json_response(resp, body)


def _progress(lines: str) -> dict | None:
    last = lines.rstrip("\n").rpartition("\n")[2]
    done, _, total = last.removeprefix("indexed ").partition("/")
    return {"chunks_done": int(done), "chunks_total": int(total)} if done.isdigit() and total.isdigit() else None


class Result:
    auth = READ

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, task_id):
        info = self.api.query(req, task_id)
        rec = info.task
        if rec.state not in P.FINAL_STATES:
            # Not done yet: 202 says "accepted, still processing"; poll again.
            json_response(resp, {"task_id": rec.task_id, "state": rec.state}, falcon.HTTP_202)
            resp.set_header("Retry-After", "1")
            return
        if rec.result_expired:
            raise ApiError(410, "result_expired", f"results are kept {self.api.s.result_ttl_s:g}s after the task "
                           "ends; this one is gone", {"state": rec.state, "finished_at": rec.finished_at})
        json_response(resp, {"task_id": rec.task_id, "state": rec.state, "result": rec.result, "error": rec.error,
                     "finished_at": rec.finished_at})


class Cancel:
    auth = WRITE

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp, task_id):
        info = self.api.broker().cancel(self.api.task_id(task_id), *self.api.owner(req))
        json_response(resp, {"task_id": info.task.task_id, "state": info.task.state})


class Stats:
    auth = READ

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        stats = self.api.broker().stats()
        body = msgspec.structs.asdict(stats)  # array-like on the wire, an object here
        del body["req"]
        json_response(resp, body)


class Health:
    """healthy / backing_up answer 200, stalled 503: a load balancer can act on it.

    The rule (computed by the broker, see README): stalled when tasks are queued and
    no instance is registered, or nothing was dispatched or finished for
    HEALTH_STALL_S; backing_up when the queue is at 80 % of QUEUE_MAX_SIZE or its
    oldest task has waited more than HEALTH_BACKLOG_WAIT_S; healthy otherwise.
    """

    auth = READ

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        st = self.api.broker().stats()
        body = {"status": st.health, "reason": st.health_reason, "queued": st.queued, "running": st.running,
                "workers": len(st.workers), "oldest_queued_s": st.oldest_queued_s,
                "last_progress_s": st.last_progress_s}
        json_response(resp, body, falcon.HTTP_503 if st.health == "stalled" else falcon.HTTP_200)

class Stream:
    """SSE: `token` events with text as llama.cpp produces it, then one `result` event
    with the final record, or one `error` event that says why the stream ends first
    (stream_timeout, task_restarted, stream_interrupted, broker_unavailable,
    shutting_down; follow.py)."""

    auth = READ

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, task_id):
        task_id = self.api.task_id(task_id)
        watch = self.api.broker().watch(task_id)  # before the first query: miss nothing
        try:
            info = self.api.query(req, task_id)  # 404 before any byte is sent
        except BaseException:
            watch.close()
            raise
        deadline = info.task.created_at + self.api.s.task_timeout_max_s + 5
        sse_response(resp, self._events(task_id, deadline, self.api.owner(req), watch))

    def _events(self, task_id: str, deadline: float, owner, watch):
        for kind, value in follow(self.api, task_id, deadline, owner, watch):
            if kind == "text":
                yield sse_event({"text": value}, "token")
            elif kind == "final":
                rec = msgspec.to_builtins(value)
                yield sse_event(rec, "result")
            elif kind == "idle":
                yield KEEPALIVE
            elif kind == "interrupted":
                yield sse_event({"error": {"code": value.code, "message": value.message}}, "error")
            else:
                yield sse_event({"error": {"code": "stream_timeout", "message": "the task did not end in time"}},
                                "error")


def add_routes(app: falcon.App, api: Api) -> None:
    app.add_route("/v1/async/submit", Submit(api))
    app.add_route("/v1/async/submit-batch", SubmitBatch(api))
    app.add_route("/v1/async/status/{task_id}", Status(api))
    app.add_route("/v1/async/result/{task_id}", Result(api))
    app.add_route("/v1/async/cancel/{task_id}", Cancel(api))
    app.add_route("/v1/async/stream/{task_id}", Stream(api))
    app.add_route("/v1/async/stats", Stats(api))
    app.add_route("/v1/async/health", Health(api))
