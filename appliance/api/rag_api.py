"""Retrieval over the site's documents: /v1/rag/documents and /v1/rag/search.

Every call is a task of the broker's `rag` service (appliance/rag/handler.py):
ingestion at batch priority (it never starves interactive work; its progress shows
in the task's status), reads, deletes and searches at high priority, waited for here.
The tenant is the caller's; a document shared site-wide (an admin's choice) is seen
by every tenant. A document's id is derived from its tenant and its text, so sending
the same text twice is one document.
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, Union

import falcon
import msgspec
from msgspec import Meta

from .. import protocol as P
from .base import Api, json_response
from .errors import ApiError, invalid_field

_DOC_ID = re.compile(r"^[0-9a-f]{32}$")
WAIT_S = 10.0  # a read, delete or search waits this long at most (it runs at high priority)

MetaValue = Union[str, P.Int64, float, bool]


class DocumentBody(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, Meta(min_length=1, max_length=500)]
    text: Annotated[str, Meta(min_length=1)]  # bounded by RAG_MAX_DOC_CHARS and MAX_BODY_BYTES
    metadata: Annotated[dict[Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], MetaValue],
                        Meta(max_length=32)] = {}
    shared: bool = False  # site-wide: every tenant sees it (admin callers only)


class SearchBody(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[str, Meta(min_length=1)]  # at most MAX_PROMPT_CHARS
    k: P.K = 5
    filter: P.Filter | None = None
    mode: P.SearchMode = "hybrid"


class DocumentAccepted(msgspec.Struct):
    document_id: str
    task_id: str
    state: str
    status_url: str


# a failed RAG task's code -> the HTTP status that means the same
_STATUS = {"not_found": 404, "invalid_field": 422, "forbidden": 403, "embedder_mismatch": 409, "timeout": 504}


def _run(api: Api, req, spec: P.TaskSpec, what: str) -> Any:
    """Submit a RAG task, wait for its end, and answer its data or its error."""
    task_id, watch = api.start(req, spec)
    rec = api.wait(req, task_id, watch, time.time() + WAIT_S, what)
    if rec.state == "completed" and rec.result is not None:
        return rec.result.data
    err = rec.error or P.TaskError(rec.state, f"{what} ended {rec.state}")
    status = _STATUS.get(err.code, 502)
    raise ApiError(status, err.code if status != 502 else "rag_failed", err.message, {"task_id": task_id})


def _doc_id(raw: str) -> str:
    if not _DOC_ID.match(raw):  # cannot exist: the same answer as an unknown id
        raise ApiError(404, "not_found", "no such document")
    return raw


class Documents:
    new_work = True
    auth = {"POST": "rag:write", "GET": "rag:read"}

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        body = self._body(req)
        s = self.api.s
        if not body.text.strip():
            raise invalid_field("text", "the document is empty")
        if len(body.text) > s.rag_max_doc_chars:
            raise ApiError(413, "document_too_large", f"text is {len(body.text)} characters; the limit is "
                           f"{s.rag_max_doc_chars} (RAG_MAX_DOC_CHARS)", {"limit": s.rag_max_doc_chars})
        principal = req.context.principal
        if body.shared and not principal.admin:
            raise ApiError(403, "insufficient_scope", "only an admin shares a document site-wide",
                           {"required": "admin"})
        doc_id = P.document_id(principal.tenant, body.text)
        spec = P.RagIngestTask(priority="batch", timeout_s=s.task_timeout_max_s, documents=[P.RagDocument(
            doc_id, body.title, body.text, body.metadata, body.shared)])
        accepted = self.api.broker().submit(spec, principal.tenant)
        req.context.audit_ids = [accepted.task_id]
        json_response(resp, DocumentAccepted(doc_id, accepted.task_id, accepted.state,
                                             f"/v1/async/status/{accepted.task_id}"), falcon.HTTP_202)

    def _body(self, req) -> DocumentBody:
        """JSON {title, text, metadata, shared}, or a text/plain or text/markdown upload
        with ?title= (and the same limits)."""
        media = (req.content_type or "").split(";")[0].strip().lower()
        if media in ("text/plain", "text/markdown"):
            title = req.get_param("title") or ""
            if not 1 <= len(title) <= 500:
                raise invalid_field("title", "a text upload names its title in ?title= (1 to 500 characters)")
            raw = self.api.read_bytes(req)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "malformed_body", "a text upload must be UTF-8") from None
            return DocumentBody(title=title, text=text, shared=req.get_param_as_bool("shared") or False)
        return self.api.read_json(req, DocumentBody)

    def on_get(self, req, resp):
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000) or 100
        offset = req.get_param_as_int("offset", min_value=0) or 0
        spec = P.RagDocsTask(priority="high", timeout_s=WAIT_S, op="list", limit=limit, offset=offset)
        json_response(resp, _run(self.api, req, spec, "listing the documents"))


class Document:
    auth = {"GET": "rag:read", "DELETE": "rag:write"}

    def __init__(self, api: Api):
        self.api = api

    def on_get(self, req, resp, document_id):
        spec = P.RagDocsTask(priority="high", timeout_s=WAIT_S, op="get", document_id=_doc_id(document_id))
        json_response(resp, _run(self.api, req, spec, "reading the document"))

    def on_delete(self, req, resp, document_id):
        spec = P.RagDocsTask(priority="high", timeout_s=WAIT_S, op="delete", document_id=_doc_id(document_id),
                             admin=req.context.principal.admin)
        json_response(resp, _run(self.api, req, spec, "deleting the document"))


class Search:
    auth = {"POST": "rag:read"}

    def __init__(self, api: Api):
        self.api = api

    def on_post(self, req, resp):
        body = self.api.read_json(req, SearchBody)
        if len(body.query) > self.api.s.max_prompt_chars:
            raise invalid_field("query", f"{len(body.query)} characters; at most {self.api.s.max_prompt_chars} "
                                "(MAX_PROMPT_CHARS)")
        spec = P.RagSearchTask(priority="high", timeout_s=WAIT_S, query=body.query, k=body.k, filter=body.filter,
                               mode=body.mode)
        json_response(resp, _run(self.api, req, spec, "the search"))


def add_routes(app: falcon.App, api: Api) -> None:
    app.add_route("/v1/rag/documents", Documents(api))
    app.add_route("/v1/rag/documents/{document_id}", Document(api))
    app.add_route("/v1/rag/search", Search(api))
