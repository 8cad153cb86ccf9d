"""A launcher: owns one llama.cpp server and serves the broker as a worker.

It starts the server, waits for its /health, registers with the broker (Ready, then
Credit for its slots), and runs each dispatched task on a thread of its own against
llama.cpp's HTTP API. The ZeroMQ socket belongs to the main loop only: task threads
hand their results back over an inproc PUSH socket.
"""
from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import jsonschema
import msgspec
import referencing
import referencing.exceptions
import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..grammar import SchemaError, compile_schema
from ..logs import exception_summary
from .server import ServerStartError, new_api_key, start_server
from .tinymodel import ensure_tiny_model

log = logging.getLogger("appliance.llama")

# Consecutive failed /health checks (one per heartbeat) after which the launcher
# exits, so that supervisord restarts it together with its llama.cpp server.
HEALTH_FAILURES_FATAL = 3


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


def request_for(spec: P.TaskSpec) -> tuple[str, dict]:
    """The llama.cpp (OpenAI-style) request that runs this task."""
    if isinstance(spec, P.EmbedTask):
        return "/v1/embeddings", {"input": spec.texts}
    body: dict = {"max_tokens": spec.max_tokens, "stream_options": {"include_usage": True}}
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.seed is not None:
        body["seed"] = spec.seed
    if isinstance(spec, P.CompleteTask):
        body["prompt"] = spec.prompt
        return "/v1/completions", body
    body["messages"] = [{"role": m.role, "content": m.content} for m in spec.messages]
    if isinstance(spec, P.ExtractTask):
        body["grammar"] = compile_schema(spec.json_schema)  # cached: a schema used again is not reconverted
    return "/v1/chat/completions", body


def validate_extract(data, schema: dict) -> None:
    """Raise jsonschema.ValidationError unless `data` is valid against `schema`.

    References resolve inside the schema only: a `$ref` to a URL is never fetched (no
    request leaves the box on a client's say-so) and fails as unresolvable."""
    jsonschema.Draft202012Validator(schema, registry=referencing.Registry()).validate(data)


def _failure(task_id: str, exc: BaseException, spec: P.TaskSpec) -> P.Done:
    """Every way a llama.cpp request can go wrong, as a Done with a stable code."""
    if isinstance(exc, Aborted):
        return P.Done(task_id, error=P.TaskError(str(exc), f"aborted ({exc}); llama.cpp request closed"))
    if isinstance(exc, TimeoutError):
        return P.Done(task_id, error=P.TaskError("timeout", f"did not finish within {spec.timeout_s:g}s"))
    if isinstance(exc, LlamaHTTPError):
        return P.Done(task_id, error=P.TaskError("llama_rejected", str(exc)))
    return P.Done(task_id, error=P.TaskError("llama_unavailable", f"{type(exc).__name__}: {exc}"))


_REQUEST_ERRORS = (Aborted, TimeoutError, LlamaHTTPError, OSError, http.client.HTTPException, ValueError)


def run_task(client: LlamaClient, model: str, task_id: str, spec: P.TaskSpec, deadline: float,
             on_text=None) -> P.Done:
    """One task against llama.cpp; every failure becomes a Done with an error code.

    `on_text(piece)` is called with each piece of generated text as it arrives.
    """
    if deadline - time.time() <= 0:
        return P.Done(task_id, error=P.TaskError("timeout", "deadline passed before the model started"))
    try:
        path, body = request_for(spec)
    except SchemaError as exc:  # the API checks schemas up front; a direct client may not have
        return P.Done(task_id, error=P.TaskError("invalid_schema", str(exc)))
    if isinstance(spec, P.EmbedTask):
        try:
            data = client.post_json(task_id, path, body, deadline)
        except _REQUEST_ERRORS as exc:
            return _failure(task_id, exc, spec)
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            vectors = [[float(v) for v in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            return P.Done(task_id, error=P.TaskError("llama_bad_response", f"unexpected answer shape: {exc}"))
        usage = data.get("usage") or {}
        return P.Done(task_id, result=P.TaskResult(embeddings=vectors, model=model,
                                                   prompt_tokens=usage.get("prompt_tokens", 0)))
    pieces: list[str] = []
    finish_reason, usage, timings = "", {}, None
    try:
        for event in client.stream(task_id, path, body, deadline):
            if "error" in event:
                err = event["error"] or {}
                return P.Done(task_id, error=P.TaskError(
                    "llama_rejected", f"{err.get('type', 'error')}: {err.get('message', '')}"))
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if spec.type != "complete" else choice.get("text")
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    except _REQUEST_ERRORS as exc:
        return _failure(task_id, exc, spec)
    text = "".join(pieces)
    data = None
    if isinstance(spec, P.ExtractTask):
        try:
            data = json.loads(text)
            validate_extract(data, spec.json_schema)
        except (ValueError, jsonschema.ValidationError, referencing.exceptions.Unresolvable) as exc:
            why = "cut off by max_tokens" if finish_reason == "length" else str(exc).splitlines()[0]
            return P.Done(task_id, error=P.TaskError("extract_invalid", f"output is not valid against the "
                                                     f"schema: {why}"))
    try:
        return P.Done(task_id, result=P.TaskResult(
            text=text,
            data=data,
            finish_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            model=model,
            timings=msgspec.convert(timings, P.Timings) if timings else None,
        ))
    except msgspec.ValidationError as exc:
        return P.Done(task_id, error=P.TaskError("llama_bad_response", f"unexpected timings: {exc}"))


class Launcher:
    def __init__(self, settings: Settings, index: int):
        self.s = settings
        self.name = f"llama-{index}"
        self.index = index
        self.ctx = zmq.Context.instance()
        self.results = self.ctx.socket(zmq.PULL)
        self.results_addr = f"inproc://results-{id(self)}"
        self.results.bind(self.results_addr)
        self.sock: zmq.Socket | None = None
        self.running: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=settings.llama_slots, thread_name_prefix="task")
        self._push = threading.local()
        self._stop = False
        self.server = None

    # --------------------------------------------------------------- lifecycle
    def start_model(self) -> None:
        ensure_dirs(self.s)
        if self.s.uses_tiny_model:
            ensure_tiny_model(self.s.model_file)
        elif not self.s.model_file.is_file():
            raise ServerStartError(f"MODEL_PATH={self.s.model_path} does not exist")
        t0 = time.monotonic()
        self.server = start_server(self.s, self.index, self.s.model_name, api_key=new_api_key(self.s, self.index))
        self.client = LlamaClient(self.server.base_url, self.server.api_key)
        log.info("%s: llama.cpp healthy at %s in %.2fs (model %s, %d slots)", self.name,
                 self.server.base_url, time.monotonic() - t0, self.s.model_name, self.s.llama_slots)

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.connect(self.s.broker_back)
        self._send(P.Ready(self.name, self.s.model_name, self.s.llama_slots, self.server.base_url,
                           running=sorted(self.running)))
        free = self.s.llama_slots - len(self.running)
        if free:
            self._send(P.Credit(free))
        self.broker_seen = time.monotonic()

    def _send(self, msg) -> None:
        self.sock.send(P.encode(msg))

    def stop(self, *_: object) -> None:
        self._stop = True

    # --------------------------------------------------------------- task side
    def _run(self, task_id: str, spec: P.TaskSpec, deadline: float) -> None:
        push = getattr(self._push, "sock", None)
        if push is None:
            push = self._push.sock = self.ctx.socket(zmq.PUSH)
            push.connect(self.results_addr)
        buffered: list[str] = []
        seq = 0
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal seq, last_flush
            if buffered:
                seq += 1
                push.send(P.encode(P.Tokens(task_id, seq, "".join(buffered))))
                buffered.clear()
            last_flush = time.monotonic()

        def on_text(piece: str) -> None:
            buffered.append(piece)
            if time.monotonic() - last_flush >= P.TOKEN_FLUSH_S:
                flush()

        try:
            done = run_task(self.client, self.s.model_name, task_id, spec, deadline, on_text)
        except Exception as exc:  # never lose a task to a bug here
            log.error("task %s failed unexpectedly: %s", task_id, exception_summary(exc))
            done = P.Done(task_id, error=P.TaskError("worker_error", type(exc).__name__))
        if self.s.log_clinical_text:  # explicit opt-in, announced at start
            text_in = getattr(spec, "messages", None) or getattr(spec, "prompt", None) or getattr(spec, "texts", None)
            log.info("task %s input=%r output=%r", task_id, text_in, done.result.text if done.result else None)
        flush()  # the last tokens go before the Done, on the same socket: in order
        push.send(P.encode(done))

    # --------------------------------------------------------------- main loop
    def serve(self) -> None:
        self._connect()
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S
        health_failures = 0
        while not self._stop:
            ready = dict(poller.poll(max(0, int((next_beat - time.monotonic()) * 1000))))
            if self.results in ready:
                while True:
                    try:
                        payload = self.results.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = P.worker_to_broker.decode(payload)
                    self.sock.send(payload)
                    if isinstance(msg, P.Done):
                        self.running.discard(msg.task_id)
                        self.client.forget(msg.task_id)
                        self._send(P.Credit(1))
            if self.sock in ready:
                self.broker_seen = time.monotonic()
                while True:
                    try:
                        payload = self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = P.broker_to_worker.decode(payload)
                    if isinstance(msg, P.Dispatch):
                        self.running.add(msg.task_id)
                        self.pool.submit(self._run, msg.task_id, msg.spec, msg.deadline)
                    elif isinstance(msg, P.Abort):
                        if msg.task_id in self.running:
                            self.client.abort(msg.task_id, msg.reason)
                    elif isinstance(msg, P.Disconnect):
                        log.info("%s: broker asked us to register again", self.name)
                        poller.unregister(self.sock)
                        self._connect()
                        poller.register(self.sock, zmq.POLLIN)
                        break
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + P.HEARTBEAT_INTERVAL_S
                if now - self.broker_seen > self.s.worker_liveness_s:
                    log.warning("%s: broker silent; reconnecting", self.name)
                    poller.unregister(self.sock)
                    self._connect()
                    poller.register(self.sock, zmq.POLLIN)
                else:
                    self._send(P.Heartbeat())
                if self.server.health(timeout=2.0):
                    health_failures = 0
                else:
                    health_failures += 1
                    log.warning("%s: llama.cpp /health failed (%d in a row)", self.name, health_failures)
                    if health_failures >= HEALTH_FAILURES_FATAL:
                        raise ServerStartError("llama.cpp stopped answering /health")
        self._send(P.Disconnect())
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.stop()
        if self.sock is not None:
            self.sock.close(0)
        self.results.close(0)


def main(settings: Settings, index: int) -> None:
    if settings.log_clinical_text:
        log.warning("!!! LOG_CLINICAL_TEXT=true: prompts and generated text WILL be written to this log")
    launcher = Launcher(settings, index)
    signal.signal(signal.SIGTERM, launcher.stop)
    signal.signal(signal.SIGINT, launcher.stop)
    launcher.start_model()
    try:
        launcher.serve()
    finally:
        launcher.close()
