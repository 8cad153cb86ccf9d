"""The API's Prometheus metrics, recorded by one Falcon middleware.

It sits first in the middleware list, so its process_response runs last and sees
the final status, refusals by the guard included. Labels are bounded: the route is
Falcon's `uri_template` (the template, never the path a client typed; `unmatched`
for unknown routes), the method one of the HTTP methods (`other` for anything else),
the refusal reason our own error code, the rate-limit scope one of the configured
scopes. The duration ends when the response is ready to send: a stream's body is not
part of it.
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from .middleware import required_scope

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("appliance_api_requests_total", "HTTP requests answered, by route template, method and status",
                   ["route", "method", "status"])
DURATION = Histogram("appliance_api_request_duration_seconds", "Time from request to response ready, by route "
                     "template and method", ["route", "method"], buckets=_BUCKETS)
IN_FLIGHT = Gauge("appliance_api_requests_in_flight", "Requests being handled now, over every API worker",
                  multiprocess_mode="livesum")
AUTH_REFUSALS = Counter("appliance_api_auth_refusals_total", "Requests refused 401 or 403, by error code",
                        ["reason"])
RATE_LIMITED = Counter("appliance_api_rate_limited_total", "Requests refused 429 rate_limited, by token-bucket "
                       "scope", ["scope"])
LLAMACPP_SCRAPE_FAILURES = Counter("appliance_api_llamacpp_scrape_failures_total", "llama.cpp /metrics fetches "
                                   "that failed during a /metrics scrape (the instance was skipped)", ["instance"])


class RequestMetrics:
    def process_request(self, req, resp) -> None:
        req.context.metrics_t0 = time.perf_counter()
        IN_FLIGHT.inc()

    def process_response(self, req, resp, resource, req_succeeded: bool) -> None:
        t0 = req.context.get("metrics_t0")
        if t0 is None:
            return
        IN_FLIGHT.dec()
        route = req.uri_template or "unmatched"
        method = req.method if req.method in METHODS else "other"
        status = resp.status_code
        REQUESTS.labels(route, method, str(status)).inc()
        DURATION.labels(route, method).observe(time.perf_counter() - t0)
        if status in (401, 403):
            AUTH_REFUSALS.labels(req.context.get("error_code") or f"http_{status}").inc()
        elif status == 429 and req.context.get("error_code") == "rate_limited":
            RATE_LIMITED.labels(required_scope(resource, req.method) or "unknown").inc()
