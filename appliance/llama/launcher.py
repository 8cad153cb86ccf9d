"""A launcher: owns one llama.cpp server and serves the broker through the worker loop.

It starts the server (embedded or an external binary), waits for its /health, and
hands the shared worker loop (appliance/worker.py) a handler that runs each task
against llama.cpp's HTTP API. Everything about the broker's protocol lives in the
loop; everything about llama.cpp lives here, in client.py and in tasks.py.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Callable

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..worker import WorkerLoop
from .client import LlamaClient
from .server import ServerStartError, new_api_key, start_server
from .tasks import run_task
from .tinymodel import ensure_tiny_model

log = logging.getLogger("appliance.llama")


class LlamaHandler:
    """The worker loop's handler for one llama.cpp server."""

    def __init__(self, settings: Settings, index: int):
        self.s = settings
        self.index = index
        self.name = f"llama-{index}"
        self.model = settings.model_name
        self.slots = settings.llama_slots
        self.endpoint = ""
        self.server = None
        self.client: LlamaClient | None = None

    def start(self) -> None:
        ensure_dirs(self.s)
        if self.s.uses_tiny_model:
            ensure_tiny_model(self.s.model_file)
        elif not self.s.model_file.is_file():
            raise ServerStartError(f"MODEL_PATH={self.s.model_path} does not exist")
        t0 = time.monotonic()
        self.server = start_server(self.s, self.index, self.model, api_key=new_api_key(self.s, self.index))
        self.endpoint = self.server.base_url
        self.client = LlamaClient(self.server.base_url, self.server.api_key)
        log.info("%s: llama.cpp healthy at %s in %.2fs (model %s, %d slots)", self.name, self.endpoint,
                 time.monotonic() - t0, self.model, self.slots)

    def run(self, task_id: str, spec: P.TaskSpec, deadline: float, on_text: Callable[[str], None]) -> P.Done:
        try:
            done = run_task(self.client, self.model, task_id, spec, deadline, on_text)
        finally:
            self.client.forget(task_id)
        if self.s.log_clinical_text:  # explicit opt-in, announced at start
            text_in = getattr(spec, "messages", None) or getattr(spec, "prompt", None) or getattr(spec, "texts", None)
            log.info("task %s input=%r output=%r", task_id, text_in, done.result.text if done.result else None)
        return done

    def abort(self, task_id: str, reason: str) -> None:
        self.client.abort(task_id, reason)

    def healthy(self) -> bool:
        return self.server.health(timeout=2.0)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def main(settings: Settings, index: int) -> None:
    if settings.log_clinical_text:
        log.warning("!!! LOG_CLINICAL_TEXT=true: prompts and generated text WILL be written to this log")
    handler = LlamaHandler(settings, index)
    loop = WorkerLoop(handler, settings.broker_back, settings.worker_liveness_s)
    signal.signal(signal.SIGTERM, loop.stop)  # also during the model's start: serve() then returns at once
    signal.signal(signal.SIGINT, loop.stop)
    try:
        handler.start()
        loop.serve()
    finally:
        loop.close()
        handler.close()
