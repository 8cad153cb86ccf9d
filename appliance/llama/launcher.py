"""A launcher: owns one llama.cpp server and serves the broker through the worker loop.

It starts the server (embedded or an external binary), waits for its /health, and
hands the shared worker loop (appliance/worker.py) a handler that runs each task
against llama.cpp's HTTP API. Everything about the broker's protocol lives in the
loop; everything about llama.cpp lives here, in client.py and in tasks.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

from .. import instances
from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..gpu.gguf_meta import ModelMetaError, read_meta
from ..metrics import instance as metrics
from ..worker import Unhealthy, WorkerLoop
from .client import LlamaClient
from .provenance import quantization_of, sha256_of
from .server import ServerStartError, new_api_key, start_server
from .tasks import run_task
from .tinymodel import ensure_tiny_model

log = logging.getLogger("appliance.llama")


def count_start(s: Settings, name: str) -> int:
    """How many times this instance has started since `appliance up` (which clears the counts)."""
    path = Path(s.run_dir) / f"{name}.starts"
    try:
        starts = int(path.read_text()) + 1
    except (OSError, ValueError):
        starts = 1
    path.write_text(str(starts))
    return starts


def engine_report(inst: instances.Instance) -> dict:
    """How many layers llama.cpp offloads, as far as llama.cpp itself tells (it logs the
    count only at verbosity 4): the embedded build lists its backends, and one with no
    GPU device offloads nothing whatever gpu_layers says."""
    try:
        total = read_meta(inst.model_path).n_layer + 1  # the blocks and the output layer
    except ModelMetaError:
        total = None
    if inst.engine == "external":
        return {"layers_total": total, "layers_offloaded": None,
                "layers_source": "unknown: an external llama-server logs it only at verbosity 4 (-lv 4)"}
    import xllamacpp

    devices = [d["name"] for d in xllamacpp.get_device_info()
               if d["type"] != xllamacpp.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_CPU]
    if not devices:
        return {"layers_total": total, "layers_offloaded": 0,
                "layers_source": "llama.cpp: this build has no GPU device"}
    return {"layers_total": total, "layers_offloaded": min(inst.gpu_layers, total or inst.gpu_layers),
            "layers_source": f"gpu_layers, on llama.cpp devices {', '.join(devices)}"}


def write_engine_report(s: Settings, inst: instances.Instance) -> None:
    """RUN_DIR/NAME.engine.json, read by GET /v1/gpu/status."""
    try:
        (Path(s.run_dir) / f"{inst.name}.engine.json").write_text(json.dumps(engine_report(inst)))
    except OSError as exc:
        log.warning("%s: engine report not written: %s", inst.name, exc.strerror)


class LlamaHandler:
    """The worker loop's handler for one llama.cpp server."""

    def __init__(self, settings: Settings, inst: instances.Instance):
        self.s = settings
        self.inst = inst
        self.name = inst.name
        self.model = inst.alias
        self.slots = inst.slots
        self.reserved = inst.reserved_slots
        self.gpu = inst.gpu
        self.starts = 1
        self.endpoint = ""
        self.server = None
        self.client: LlamaClient | None = None
        self.provenance: P.Provenance | None = None

    def start(self) -> None:
        ensure_dirs(self.s)
        inst = self.inst
        if inst.tiny:
            ensure_tiny_model(Path(inst.model_path))
        elif not Path(inst.model_path).is_file():
            raise ServerStartError(f"{inst.name}: model {inst.model_path} does not exist")
        self.starts = count_start(self.s, inst.name)
        metrics.started(inst.name)
        path = Path(inst.model_path)
        t0 = time.monotonic()
        self.provenance = P.Provenance(model=inst.alias, gguf_sha256=sha256_of(path, Path(self.s.data_dir)),
                                       quantization=quantization_of(path), instance=inst.name)
        t1 = time.monotonic()
        self.server = start_server(self.s, inst, api_key=new_api_key(self.s, inst.name))
        write_engine_report(self.s, inst)
        self.endpoint = self.server.base_url
        self.client = LlamaClient(self.server.base_url, self.server.api_key)
        log.info("%s: llama.cpp healthy at %s in %.2fs (model %s, %s, sha256 %s... in %.2fs; %d slots, %d "
                 "reserved; %s; start %d)", inst.name, self.endpoint, time.monotonic() - t1, inst.alias,
                 self.provenance.quantization, self.provenance.gguf_sha256[:12], t1 - t0, inst.slots,
                 inst.reserved_slots, f"GPU {inst.gpu}" if inst.gpu >= 0 else "CPU only", self.starts)

    def run(self, task_id: str, spec: P.TaskSpec, deadline: float, on_text: Callable[[str], None],
            tenant: str = "") -> P.Done:
        try:
            done = run_task(self.client, self.model, task_id, spec, deadline, on_text, self.provenance)
        finally:
            self.client.forget(task_id)
        if self.s.log_clinical_text:  # explicit opt-in, announced at start
            text_in = getattr(spec, "messages", None) or getattr(spec, "prompt", None) or getattr(spec, "texts", None)
            log.info("task %s input=%r output=%r", task_id, text_in, done.result.text if done.result else None)
        return done

    def abort(self, task_id: str, reason: str) -> None:
        self.client.abort(task_id, reason)

    def healthy(self) -> bool:
        try:
            self.server.check_alive()
        except ServerStartError as exc:  # an external server that exited will not come back by waiting
            raise Unhealthy(f"{self.name}: {exc}") from None
        return self.server.health(timeout=2.0)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def main(settings: Settings, name: str) -> None:
    if settings.log_clinical_text:
        log.warning("!!! LOG_CLINICAL_TEXT=true: prompts and generated text WILL be written to this log")
    inst = instances.find(instances.load(settings), name)
    # Pinned to its GPU (an embedded CPU build ignores it; an external CUDA server inherits it).
    os.environ["CUDA_VISIBLE_DEVICES"] = str(inst.gpu) if inst.gpu >= 0 else ""
    handler = LlamaHandler(settings, inst)
    loop = WorkerLoop(handler, settings.broker_back, settings.worker_liveness_s, settings.drain_grace_s)
    signal.signal(signal.SIGTERM, loop.stop)  # also during the model's start: serve() then returns at once
    signal.signal(signal.SIGINT, loop.stop)
    try:
        handler.start()
        loop.serve()
    finally:
        loop.close()
        handler.close()
