"""The model instances as operators see them: GET /v1/instances, POST /v1/instances/{name}/restart.

Three sources agree here: the instances file (what is configured), the broker (what is
registered, its slots and speed) and supervisord (the process state), asked over its
XML-RPC socket. A restart goes through supervisord too, never by killing a PID.
"""
from __future__ import annotations

import logging
import xmlrpc.client

import falcon
import msgspec

from ..ops import supervisor
from .base import Api, json_response
from .errors import ApiError

log = logging.getLogger("appliance.api")


class SlotsView(msgspec.Struct):
    busy: int
    total: int
    reserved: int


class InstanceView(msgspec.Struct):
    name: str
    model: str
    endpoint: str | None       # llama.cpp's base URL while registered
    state: str                 # supervisord's (RUNNING, STARTING, BACKOFF, FATAL, ...), or "unknown"
    registered: bool           # the broker has it: it takes work
    slots: SlotsView
    restarts: int              # since the appliance came up
    gpu: int | None            # the GPU it is pinned to; null: CPU only
    throttled: bool            # its GPU is too hot: no new work
    seconds_per_token: float   # measured generation speed (EWMA); 0: not yet


class InstanceList(msgspec.Struct):
    instances: list[InstanceView]


def _states(api: Api) -> dict[str, dict]:
    try:
        return supervisor.process_states(api.s)
    except (OSError, xmlrpc.client.Error) as exc:
        log.warning("supervisord not reachable for process states: %s", exc)
        return {}


class Instances:
    auth = {"GET": "tasks:read"}

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        configured = self.api.instances()
        live = {w.name: w for w in self.api.broker().stats().workers}
        states = _states(self.api)
        views = []
        for inst in configured:
            w = live.get(inst.name)
            info = states.get(inst.name, {})
            views.append(InstanceView(
                name=inst.name, model=inst.alias, endpoint=w.endpoint if w else None,
                state=info.get("statename", "unknown"), registered=w is not None,
                slots=SlotsView(w.running if w else 0, inst.slots, inst.reserved_slots),
                restarts=max(0, w.starts - 1) if w else 0, gpu=inst.gpu if inst.gpu >= 0 else None,
                throttled=bool(w and w.throttled), seconds_per_token=w.seconds_per_token if w else 0.0))
        json_response(resp, InstanceList(views))


class Restart:
    auth = {"POST": "admin"}

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp, name):
        if name not in {i.name for i in self.api.instances()}:
            raise ApiError(404, "not_found", f"no instance named {name!r}")
        req.context.audit_ids = []
        try:
            info = supervisor.restart(self.api.s, name)
        except xmlrpc.client.Fault as fault:
            raise ApiError(409, "restart_failed", f"supervisord refused: {fault.faultString}") from None
        except OSError as exc:
            raise ApiError(503, "supervisor_unavailable", f"supervisord is not reachable: {exc.strerror}",
                           headers={"Retry-After": "1"}) from None
        json_response(resp, {"name": name, "state": info["statename"]})


def add_routes(app: falcon.App, api: Api) -> None:
    app.add_route("/v1/instances", Instances(api))
    app.add_route("/v1/instances/{name}/restart", Restart(api))
