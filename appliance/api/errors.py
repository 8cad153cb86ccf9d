"""One error model for every response: {"error": {"code", "message", "details"}}.

Each HTTP status means one thing, and `code` is stable: clients branch on it, so
renaming a code is a breaking change. Falcon's own errors (unknown route, wrong
method) are rendered the same way, and any unexpected exception becomes a 500 with
code `internal` and no detail (its traceback goes to the log, never to the client).
"""
from __future__ import annotations

import logging
import re

import falcon
import msgspec

from ..logs import exception_summary
from ..broker_client import BrokerRefused, BrokerUnavailable

log = logging.getLogger("appliance.api")

# status -> the code used when a Falcon error carries none of ours
_DEFAULT_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    429: "queue_full",
    503: "unavailable",
}


class ApiError(falcon.HTTPError):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(falcon.code_to_http_status(status), headers=headers)
        self.code = code
        self.message = message
        self.details = details or {}


# broker refusal code -> HTTP status
_REFUSAL_STATUS = {
    "not_found": 404,
    "already_final": 409,
    "invalid_field": 422,
    "batch_too_large": 422,
    "model_not_found": 404,
    "queue_full": 429,
    "storage_unavailable": 503,
    "shutting_down": 503,
}
# Retry-After (seconds) of a refusal; 1 unless said here. A restart takes a few seconds.
_RETRY_AFTER = {"shutting_down": "5"}


def from_broker(exc: Exception) -> ApiError:
    """A broker refusal (its code is ours) or a broker that did not answer, as HTTP."""
    if isinstance(exc, BrokerRefused):
        status = _REFUSAL_STATUS.get(exc.code, 400)
        headers = {"Retry-After": _RETRY_AFTER.get(exc.code, "1")} if status in (429, 503) else None
        return ApiError(status, exc.code, exc.message, headers=headers)
    return ApiError(503, "broker_unavailable", str(exc), headers={"Retry-After": "1"})


def invalid_field(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, {"field": field})


def from_validation_error(exc: msgspec.ValidationError) -> ApiError:
    """msgspec says "Expected `int`, got `str` - at `$.max_tokens`": name the field.

    A missing or unknown field is named by the message itself ("Object missing
    required field `messages` - at `$.tasks[0]`"): the field is that name at that place."""
    text = str(exc)
    message, _, where = text.rpartition(" - at `")
    if not message:
        message, where = text, ""
    field = where.rstrip("`").removeprefix("$").lstrip(".")
    named = re.match(r"Object (?:missing required|contains unknown) field `(.+)`$", message)
    if named:
        field = f"{field}.{named.group(1)}" if field else named.group(1)
    return ApiError(422, "invalid_field", message, {"field": field or None})


def _body(code: str, message: str, details: dict | None) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": message, "details": details or {}}})


def handle_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params) -> None:
    status = exc.status_code
    if isinstance(exc, ApiError):
        code, message, details = exc.code, exc.message, exc.details
    else:
        code = _DEFAULT_CODES.get(status, f"http_{status}")
        message = exc.title if exc.description is None else f"{exc.title}: {exc.description}"
        details = {}
    req.context.error_code = code  # for the audit record
    resp.status = exc.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _body(code, message, details)
    if exc.headers:
        for k, v in exc.headers.items():
            resp.set_header(k, v)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError):
        return handle_http_error(req, resp, exc, params)
    if isinstance(exc, (BrokerRefused, BrokerUnavailable)):
        return handle_http_error(req, resp, from_broker(exc), params)
    log.error("unhandled error on %s %s: %s", req.method, req.uri_template or req.path[:200],
              exception_summary(exc))
    req.context.error_code = "internal"
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _body("internal", "internal error; see the api log", None)
