"""The GPU endpoints: what the monitor reads, what a model needs, where instances go,
and how fast one instance runs.

Every figure comes from its source: readings from NVML through gpumon and the
broker (which also owns the throttle states), memory forecasts from the GGUF header
(appliance/gpu/planner.py, checked against llama.cpp's own buffers), benchmark
speeds from llama.cpp's timings. Nothing here talks to a GPU or a model directly.
"""
from __future__ import annotations

import json
import secrets
import time
import xmlrpc.client
from pathlib import Path
from typing import Annotated

import falcon
import msgspec
from msgspec import Meta

from .. import instances as inst_mod
from .. import protocol as P
from ..config import ConfigError
from ..gpu import placement, planner
from ..gpu.gguf_meta import ModelMetaError, read_meta
from ..ops import supervisor
from .base import Api, json_response
from .errors import ApiError, invalid_field

READ = {"GET": "gpu:read"}
SLOT_CHOICES = (1, 2, 4, 8, 16)
BENCH_PROMPT = ("Summarise the admission note. Patient admitted with community-acquired pneumonia, treated "
                "with intravenous antibiotics, oxygen by nasal cannula, improving over three days; ") * 3


def _int_param(req: falcon.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = req.get_param(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_field(name, f"an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise invalid_field(name, f"an integer from {low} to {high}, not {value}")
    return value


class Gpus:
    """Shared: the configured instances, their models' metadata, the broker's GPU view."""

    def __init__(self, api: Api):
        self.api = api
        self.s = api.s

    def instance_of_model(self, model: str | None) -> inst_mod.Instance:
        configured = self.api.instances()
        if model is None:
            return configured[0]
        for inst in configured:
            if inst.alias == model:
                return inst
        raise ApiError(404, "model_not_found", f"no instance is configured for model {model!r}",
                       {"models": inst_mod.models(configured)})

    def meta(self, inst: inst_mod.Instance):
        try:
            return read_meta(inst.model_path)
        except ModelMetaError as exc:
            raise ApiError(503, "model_unreadable", f"{inst.alias}: {exc}", headers={"Retry-After": "5"}) from None

    def forecast(self, inst: inst_mod.Instance, meta, n_ctx: int, n_parallel: int, kv_type: str = "f16",
                 gpu_layers: int | None = None) -> planner.Forecast:
        layers = inst.gpu_layers if gpu_layers is None else gpu_layers
        return planner.forecast(meta, n_ctx, n_parallel, kv_type, gpu_layers=layers,
                                cuda_context_mb=self.s.gpu_cuda_context_mb, embeddings=inst.embeddings)

    def status(self) -> P.GpuStatus:
        return self.api.broker().gpu()


class Status:
    """GET /v1/gpu/status: the latest readings, throttle states, and instances per GPU."""

    auth = READ

    def __init__(self, gpus: Gpus):
        self.g = gpus

    def on_get(self, req, resp):
        st = self.g.status()
        configured = self.g.api.instances()
        live = {w.name: w for w in st.workers}
        states = {x.index: x for x in st.states}
        tel = st.telemetry

        def view(inst: inst_mod.Instance, reading: P.GpuReading | None) -> dict:
            w = live.get(inst.name)
            procs = [p for p in (reading.processes or []) if p.instance == inst.name] if reading else []
            engine = _engine_report(self.g.s, inst.name)
            return {"name": inst.name, "model": inst.alias, "registered": w is not None,
                    "running": w.running if w else 0, "slots": inst.slots,
                    "gpu_memory_mb": round(sum(p.memory_mb for p in procs), 1) if reading and
                    reading.processes is not None else None,
                    "layers_offloaded": engine.get("layers_offloaded"), "layers_total": engine.get("layers_total"),
                    "layers_source": engine.get("layers_source")}
        gpus = []
        for r in (tel.gpus if tel else []):
            state = states.get(r.index, P.GpuState(r.index, False))
            gpus.append({**msgspec.to_builtins(r), "throttled": state.throttled, "throttle_reason": state.reason,
                         "instances": [view(i, r) for i in configured if i.gpu == r.index]})
        json_response(resp, {
            "source": tel.source if tel else "none", "cpu_only": tel.cpu_only if tel else True,
            "reason": (tel.reason if tel else "no telemetry from gpumon yet"), "ts": tel.ts if tel else None,
            "limits": {"thermal_limit_c": self.g.s.thermal_limit_c, "thermal_resume_c": self.g.s.thermal_resume_c,
                       "memory_pressure_pct": self.g.s.memory_pressure_pct},
            "gpus": gpus, "cpu_instances": [view(i, None) for i in configured if i.gpu < 0]})


def _engine_report(s, name: str) -> dict:
    """What the launcher learned from llama.cpp at start (RUN_DIR/NAME.engine.json)."""
    try:
        return json.loads((Path(s.run_dir) / f"{name}.engine.json").read_text())
    except (OSError, ValueError):
        return {}


class MemoryForecast:
    """GET /v1/gpu/memory-forecast?model=&n_ctx=&n_parallel=&kv_type=&gpu_layers="""

    auth = READ

    def __init__(self, gpus: Gpus):
        self.g = gpus

    def on_get(self, req, resp):
        inst = self.g.instance_of_model(req.get_param("model"))
        n_ctx = _int_param(req, "n_ctx", inst.ctx, 1, 4_194_304)
        n_parallel = _int_param(req, "n_parallel", inst.slots, 1, 256)
        gpu_layers = _int_param(req, "gpu_layers", None, 0, 100_000)
        kv_type = req.get_param("kv_type") or "f16"
        if kv_type not in planner.KV_TYPE_BYTES:
            raise invalid_field("kv_type", f"one of {', '.join(planner.KV_TYPE_BYTES)}")
        meta = self.g.meta(inst)
        try:
            fc = self.g.forecast(inst, meta, n_ctx, n_parallel, kv_type, gpu_layers)
        except ValueError as exc:
            raise ApiError(422, "impossible_configuration", str(exc)) from None
        tel = self.g.status().telemetry
        fit = [{"gpu": r.index, "fits": ok, "reason": why} for r in (tel.gpus if tel else [])
               for ok, why in [planner.fits(fc, r.memory_total_mb, r.memory_used_mb, self.g.s.gpu_plan_headroom_pct)]]
        json_response(resp, {"model": inst.alias, "file": Path(inst.model_path).name,
                             "architecture": meta.architecture, "n_layer": meta.n_layer,
                             "forecast": msgspec.to_builtins(fc), "fits": fit})


class ModelsOptimal:
    """GET /v1/gpu/models-optimal[?gpu_memory_mb=]: per configured model and GPU, the
    largest context and slot count that fit, or why none does."""

    auth = READ

    def __init__(self, gpus: Gpus):
        self.g = gpus

    def on_get(self, req, resp):
        size = _int_param(req, "gpu_memory_mb", None, 256, 10_000_000)
        if size is not None:
            rooms = [("given", float(size), float(size))]
        else:
            tel = self.g.status().telemetry
            rooms = [(r.index, r.memory_total_mb, r.memory_total_mb - r.memory_used_mb)
                     for r in (tel.gpus if tel else [])]
        seen: dict[str, inst_mod.Instance] = {}
        for inst in self.g.api.instances():
            seen.setdefault(inst.alias, inst)
        results = []
        for alias, inst in seen.items():
            meta = self.g.meta(inst)
            for gpu, total, free in rooms:
                best, why = planner.best_fit(meta, free, gpu_total_mb=total, slots=SLOT_CHOICES,
                                             headroom_pct=self.g.s.gpu_plan_headroom_pct,
                                             cuda_context_mb=self.g.s.gpu_cuda_context_mb,
                                             embeddings=inst.embeddings)
                results.append({"model": alias, "gpu": gpu, "fits": best is not None,
                                "n_ctx": best[0] if best else None, "n_parallel": best[1] if best else None,
                                "reason": why})
        json_response(resp, {"gpus": [{"gpu": g, "memory_total_mb": t, "memory_free_mb": f} for g, t, f in rooms],
                             "models": results,
                             "note": None if rooms else "no GPU seen; pass gpu_memory_mb to plan for one"})


class RebalanceBody(msgspec.Struct, forbid_unknown_fields=True):
    apply: bool = False


class Rebalance:
    """POST /v1/gpu/rebalance {apply}: a placement plan; `apply` (admin) edits the
    instances file's `gpu` values and restarts the instances that move."""

    auth = {"POST": "gpu:read"}

    def __init__(self, gpus: Gpus):
        self.g = gpus

    def on_post(self, req, resp):
        body = self.g.api.read_json(req, RebalanceBody)  # {} for a dry run
        if body.apply and not req.context.principal.allows("admin"):
            raise ApiError(403, "insufficient_scope", "applying a plan needs the `admin` scope",
                           {"required": "admin"})
        configured = self.g.api.instances()
        tel = self.g.status().telemetry
        wants = []
        for inst in configured:
            layers = inst.gpu_layers if (inst.gpu >= 0 or inst.gpu_layers > 0) else 0
            fc = self.g.forecast(inst, self.g.meta(inst), inst.ctx, inst.slots, gpu_layers=layers)
            wants.append(placement.Want(inst.name, inst.gpu, fc.gpu_mb))
        rooms = []
        for r in (tel.gpus if tel else []):
            if r.processes is not None:
                others = sum(p.memory_mb for p in r.processes if not p.instance)
            else:  # unknown per process: all it holds except our own forecasts there
                others = max(0.0, r.memory_used_mb - sum(w.gpu_mb for w in wants if w.gpu == r.index))
            rooms.append(placement.Room(r.index, r.memory_total_mb, others))
        plan = placement.plan(wants, rooms, self.g.s.gpu_plan_headroom_pct)
        moves = {p.name: p.gpu for p in plan if p.moves}
        applied = None
        if body.apply and moves:
            applied = self._apply(moves)
        json_response(resp, {"plan": [{"name": p.name, "gpu": p.gpu, "was": p.was, "moves": p.moves,
                                       "reason": p.reason} for p in plan],
                             "restart": sorted(moves), "applied": applied if body.apply else None})

    def _apply(self, moves: dict[str, int]) -> dict:
        s = self.g.s
        path = inst_mod.instances_path(s)
        if not path.is_file():
            raise ApiError(409, "instances_file_missing", f"the plan moves instances but there is no instances file "
                           f"({path}); write one (README, Several models and instances), then apply")
        text = path.read_text()
        new = placement.set_gpus(text, moves)
        try:
            instances = inst_mod.parse(new, s, str(path))
        except ConfigError as exc:
            raise ApiError(409, "plan_not_applicable", str(exc.code)) from None
        path.with_name(path.name + ".bak").write_text(text)
        path.write_text(new)
        try:
            return supervisor.reload(s, instances)
        except (OSError, xmlrpc.client.Fault) as exc:
            raise ApiError(503, "supervisor_unavailable", f"the instances file was updated ({path}; the previous one "
                           f"is {path.name}.bak) but supervisord did not apply it: {exc}; run `appliance reload`",
                           headers={"Retry-After": "5"}) from None


class BenchmarkBody(msgspec.Struct, forbid_unknown_fields=True):
    instance: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
    max_tokens: Annotated[int, Meta(ge=1, le=512)] = 64


class BenchmarkModel:
    """POST /v1/gpu/benchmark-model {instance}: a fixed short generation on that
    instance, queued at `batch` priority (it never delays interactive work), answered
    with llama.cpp's own prompt and generation speeds."""

    auth = {"POST": "admin"}

    def __init__(self, gpus: Gpus):
        self.g = gpus

    def on_post(self, req, resp):
        body = self.g.api.read_json(req, BenchmarkBody)
        inst = next((i for i in self.g.api.instances() if i.name == body.instance), None)
        if inst is None:
            raise ApiError(404, "not_found", f"no instance named {body.instance!r}")
        # A fresh prefix every time: llama.cpp must evaluate the whole prompt, not reuse its cache.
        spec = P.CompleteTask(prompt=f"[{secrets.token_hex(4)}] {BENCH_PROMPT}", max_tokens=body.max_tokens,
                              temperature=0.0, seed=0, priority="batch", model=inst.alias, timeout_s=120.0)
        t0 = time.monotonic()
        task_id, watch = self.g.api.start(req, spec, pin=inst.name)
        rec = self.g.api.wait(req, task_id, watch, time.time() + spec.timeout_s + 5, "the benchmark")
        if rec.state != "completed" or rec.result is None or rec.result.timings is None:
            err = rec.error or P.TaskError(rec.state, rec.state)
            raise ApiError(502, "benchmark_failed", err.message, {"task_id": task_id, "reason": err.code})
        t = rec.result.timings
        json_response(resp, {
            "instance": inst.name, "model": inst.alias, "task_id": task_id,
            "prompt_tokens": t.prompt_n, "prompt_tokens_per_s": round(t.prompt_n / t.prompt_ms * 1000, 1)
            if t.prompt_ms > 0 else None,
            "generated_tokens": t.predicted_n, "generation_tokens_per_s": round(t.predicted_per_second, 1),
            "queued_and_ran_s": round(time.monotonic() - t0, 3)})


def add_routes(app: falcon.App, api: Api) -> None:
    g = Gpus(api)
    app.add_route("/v1/gpu/status", Status(g))
    app.add_route("/v1/gpu/memory-forecast", MemoryForecast(g))
    app.add_route("/v1/gpu/models-optimal", ModelsOptimal(g))
    app.add_route("/v1/gpu/rebalance", Rebalance(g))
    app.add_route("/v1/gpu/benchmark-model", BenchmarkModel(g))
