"""The Falcon application: wiring of resources, error handlers, and the probes.

The API holds no queue state of its own; every answer about a task comes from the
broker. Request bodies decode straight into the protocol's Structs, so the HTTP
schema and the wire schema are the same object.
"""
from __future__ import annotations

from pathlib import Path

import falcon

from .. import protocol as P
from ..audit import AuditLog
from ..config import Settings
from . import async_api, gpu_api, instances_api, lifecycle, metrics, metrics_api, openai_api, openapi, rag_api
from .auth import Authenticator
from .base import Api, json_response
from .errors import ApiError, handle_http_error, handle_unexpected
from .middleware import OPS, PUBLIC, Audit, Guard
from .ratelimit import RateLimiter


def rate_limit_file(settings: Settings) -> Path:
    return Path(settings.run_dir) / "api-ratelimit.bin"


class Healthz:
    auth = PUBLIC

    def on_get(self, req, resp):
        json_response(resp, {"status": "ok"})


READY_PING_S = 1.0  # a readiness probe answers within this, whatever BROKER_TIMEOUT_S is


class Readyz:
    auth = OPS  # loopback callers, or a token (OPS_ENDPOINTS)

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp):
        if lifecycle.state.draining:
            raise ApiError(503, "shutting_down", "this API worker is shutting down", headers={"Retry-After": "5"})
        pong = self.api.broker().ping(timeout_s=min(READY_PING_S, self.api.s.broker_timeout_s))
        body = {"broker": "ok", "workers_ready": pong.workers_ready, "queued": pong.queued,
                "running": pong.running, "gpu": pong.gpu_state, "rag": "ok" if pong.rag_ready else "starting"}
        if pong.draining:
            raise ApiError(503, "shutting_down", "the appliance is shutting down", body,
                           headers={"Retry-After": "5"})
        if pong.workers_ready < 1:
            raise ApiError(503, "no_instance_ready", "no model instance is registered with the broker",
                           body, headers={"Retry-After": "1"})
        if not pong.rag_ready:
            raise ApiError(503, "rag_not_ready", "the RAG worker is not registered with the broker",
                           body, headers={"Retry-After": "1"})
        json_response(resp, {"status": "ready", **body})


def create_app(settings: Settings) -> falcon.App:
    """The WSGI app. Run `security.check_startup(settings)` first: this trusts the settings."""
    limiter = RateLimiter(rate_limit_file(settings), settings.rate_limit_rules)
    # RequestMetrics first: its process_response runs last and sees the final status
    middleware: list = [metrics.RequestMetrics(), Audit(AuditLog(settings.audit_log, settings.audit_key))]
    if settings.cors_origin_list:
        middleware.append(falcon.CORSMiddleware(allow_origins=settings.cors_origin_list,
                                                expose_headers=["Retry-After", "WWW-Authenticate"]))
    middleware.append(Guard(settings, Authenticator(settings), limiter))
    app = falcon.App(media_type=falcon.MEDIA_JSON, middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    api = Api(settings)
    app.add_route("/healthz", Healthz())
    app.add_route("/readyz", Readyz(api))
    app.add_route("/metrics", metrics_api.Metrics(api))
    async_api.add_routes(app, api)
    openai_api.add_routes(app, api)
    instances_api.add_routes(app, api)
    gpu_api.add_routes(app, api)
    rag_api.add_routes(app, api)
    app.add_route("/openapi.json", openapi.OpenApi(settings))
    return app
