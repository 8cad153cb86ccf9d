"""The request guard (authentication, scopes, rate limits, probe access) and the audit trail.

Every resource states what it needs in an `auth` class attribute: PUBLIC, OPS (the
probes: loopback callers, or any valid token, per OPS_ENDPOINTS), or a {method:
scope} map. A resource that states nothing needs `admin`: forgetting the declaration
fails closed. The decision is made on the resource the router picked, never on the
path's spelling (`//v1/...` routes to the same resource as `/v1/...`). Before
routing, an anonymous call to any /v1 path is refused, so that an unknown /v1 route
tells an anonymous caller nothing either.
"""
from __future__ import annotations

import ipaddress
import logging
import math

import falcon

from ..audit import AuditLog
from ..config import Settings
from .auth import Authenticator
from . import lifecycle
from .errors import ApiError
from .ratelimit import RateLimiter

log = logging.getLogger("appliance.api")

PUBLIC = "public"
OPS = "ops"


def _loopback(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _v1(path: str) -> bool:
    path = "/" + path.lstrip("/")
    return path == "/v1" or path.startswith("/v1/")


def required_scope(resource, method: str) -> str | None:
    """The scope a request needs; None for public resources and unsupported methods."""
    auth = getattr(resource, "auth", None)
    if auth in (PUBLIC, OPS):
        return None
    if auth is None:
        return "admin"
    return auth.get(method)


class Guard:
    def __init__(self, s: Settings, authenticator: Authenticator, limiter: RateLimiter):
        self.auth = authenticator
        self.limiter = limiter
        self.ops_mode = s.ops_endpoints

    def _principal(self, req: falcon.Request):
        if req.context.principal is None:
            req.context.principal = self.auth.authenticate(req.get_header("Authorization"))
        return req.context.principal

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.principal = None
        if req.method != "OPTIONS" and _v1(req.path):  # CORS preflight carries no credentials
            req.context.audited = True
            self._principal(req)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        if params and "task_id" in params:
            req.context.audit_ids = [params["task_id"][:64]]  # whatever the client sent, bounded
        if resource is None or req.method == "OPTIONS":
            return
        auth = getattr(resource, "auth", None)
        if auth == PUBLIC:
            return
        if auth == OPS:
            if self.ops_mode == "open" or (self.ops_mode == "loopback_or_token" and _loopback(req.remote_addr)):
                return  # the local monitor's probes: no audit record every few seconds
            req.context.audited = True
            self._principal(req)
            return
        req.context.audited = True
        principal = self._principal(req)
        scope = required_scope(resource, req.method)
        if scope is None:
            return  # a method the resource does not have: Falcon answers 405
        if not principal.allows(scope):
            raise ApiError(403, "insufficient_scope", f"this call needs the `{scope}` scope", {"required": scope},
                           headers={"WWW-Authenticate": f'Bearer realm="appliance", error="insufficient_scope", '
                                                        f'scope="{scope}"'})
        if lifecycle.state.draining and getattr(resource, "new_work", False):
            raise ApiError(503, "shutting_down", "the appliance is shutting down; retry after it is back",
                           headers={"Retry-After": "5"})
        wait = self.limiter.take(principal.subject, scope)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"rate limit for `{scope}` exceeded; retry after the delay",
                           {"scope": scope}, headers={"Retry-After": str(max(1, math.ceil(wait)))})


class Audit:
    """One record per guarded request (every /v1 call, probes from afar), 401s included."""

    def __init__(self, log_: AuditLog):
        self.log = log_

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        path = req.path
        if not req.context.get("audited"):
            return
        principal = req.context.get("principal")
        status = resp.status_code
        try:
            self.log.append(
                subject=principal.subject if principal else None,
                tenant=principal.tenant if principal else None,
                method=req.method,
                route=req.uri_template or path[:200],
                ids=req.context.get("audit_ids") or [],
                status=status,
                outcome="ok" if status < 400 else req.context.get("error_code", f"http_{status}"),
                remote=req.remote_addr,
            )
        except OSError as exc:
            # the response is decided; say loudly that its record is missing
            log.error("audit record not written for %s %s: %s", req.method, req.uri_template or "?", exc)
