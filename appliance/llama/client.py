"""HTTP to a llama.cpp server, abortable from another thread.

Requests are always streamed (SSE): llama.cpp notices a closed connection only when it
writes to it, so streaming is what lets an abort free the slot at once. One kept-alive
connection per task thread.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit


class Aborted(Exception):
    """The broker aborted this task (cancel or timeout); its connection was closed."""


class LlamaClient:
    """HTTP to llama.cpp, one kept-alive connection per task thread.

    Requests are always streamed (SSE): llama.cpp notices a closed connection only
    when it writes to it, so streaming is what lets an abort free the slot at once.
    """

    def __init__(self, base_url: str, api_key: str | None = None):
        u = urlsplit(base_url)
        self.host, self.port = u.hostname, u.port
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._active: dict[str, http.client.HTTPConnection] = {}
        self._aborted: dict[str, str] = {}

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def abort(self, key: str, reason: str) -> None:
        """Abort the request running (or about to run) under `key`, from any thread."""
        with self._lock:
            self._aborted[key] = reason
            conn = self._active.get(key)
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def forget(self, key: str) -> None:
        with self._lock:
            self._active.pop(key, None)
            self._aborted.pop(key, None)

    def _aborted_reason(self, key: str) -> str | None:
        with self._lock:
            self._active.pop(key, None)
            return self._aborted.get(key)

    def _failed(self, key: str, exc: BaseException) -> BaseException:
        """A request broke: its connection is unusable, and an abort, if any, explains why."""
        self._drop_conn()
        reason = self._aborted_reason(key)
        if reason is None:
            return exc
        aborted = Aborted(reason)
        aborted.__cause__ = exc
        return aborted

    def _open(self, key: str, path: str, body: dict, deadline: float) -> http.client.HTTPResponse:
        """Send the request on this thread's connection; the response's headers are read."""
        payload = json.dumps(body).encode()
        timeout = max(0.001, deadline - time.time())
        for attempt in (0, 1):  # a kept-alive connection the server closed: retry once
            conn = self._conn(timeout)
            with self._lock:
                if key in self._aborted:
                    raise Aborted(self._aborted[key])
                self._active[key] = conn
            try:
                conn.request("POST", path, payload, self._headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                failure = self._failed(key, exc)
                if failure is exc and not attempt:
                    continue  # a kept-alive connection the server had closed: once more
                raise failure
            except BaseException as exc:
                raise self._failed(key, exc)
            if resp.status != 200:
                data = resp.read()
                self._aborted_reason(key)
                raise LlamaHTTPError(resp.status, data)
            return resp
        raise AssertionError("unreachable")

    def post_json(self, key: str, path: str, body: dict, deadline: float) -> dict:
        """A plain (non-streamed) request, abortable like a stream."""
        resp = self._open(key, path, body, deadline)
        try:
            data = resp.read()
        except BaseException as exc:
            raise self._failed(key, exc)
        if (reason := self._aborted_reason(key)) is not None:
            raise Aborted(reason)
        return json.loads(data)

    def stream(self, key: str, path: str, body: dict, deadline: float):
        """POST with stream=true; yield each SSE event's JSON until [DONE].

        Raises Aborted, TimeoutError, LlamaHTTPError, or OSError/HTTPException.
        """
        resp = self._open(key, path, {**body, "stream": True}, deadline)
        try:
            for raw in resp:
                if time.time() > deadline:
                    raise TimeoutError("deadline passed while generating")
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    resp.read()  # the closing chunk: the connection stays reusable
                    break
                yield json.loads(data)
            else:
                raise http.client.IncompleteRead(b"")  # the stream ended without [DONE]
        except GeneratorExit:
            self._drop_conn()
            self._aborted_reason(key)
            raise
        except BaseException as exc:
            raise self._failed(key, exc)
        if (reason := self._aborted_reason(key)) is not None:
            raise Aborted(reason)


class LlamaHTTPError(Exception):
    def __init__(self, status: int, body: bytes):
        self.status = status
        try:
            err = json.loads(body).get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        self.code = err.get("type") or f"http_{status}"
        self.message = err.get("message") or f"llama.cpp answered {status}"
        super().__init__(f"{self.code}: {self.message}")
