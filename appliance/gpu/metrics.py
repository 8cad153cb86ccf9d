"""gpumon's Prometheus metrics: each sample's readings per GPU, as gauges.

Set from every published sample (GPUMON_INTERVAL_S), from the same Telemetry the
broker routes by. A reading the card cannot give is left unset (absent), never
shown as 0. Gauges are `livesum` (gpumon is one process): they go with it when it
dies. Throttle reasons are one gauge per known NVML reason, 1 or 0, so that every
reason is a series that exists before it first fires (`other`: a bit this code does
not know).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from .. import protocol as P
from .reasons import REASONS

_MB = 2**20
SOURCES = ("nvml", "samples", "none")
THROTTLE_REASONS = tuple(REASONS.values()) + ("other",)


def _gauge(name: str, doc: str, labels=("gpu",)) -> Gauge:
    return Gauge(name, doc, list(labels), multiprocess_mode="livesum")


UP = Gauge("appliance_gpumon_up", "1 while gpumon runs", multiprocess_mode="livesum")
SOURCE = _gauge("appliance_gpumon_source", "Where readings come from, one-hot: nvml, samples (NVML_SAMPLES) or none",
                ("source",))
SAMPLES = Counter("appliance_gpumon_samples_total", "Samples published, by whether they read the GPUs",
                  ["outcome"])
CPU_ONLY = Gauge("appliance_gpu_cpu_only", "1 when there is no usable GPU (no NVML, no device, a failed read)",
                 multiprocess_mode="livesum")
COUNT = Gauge("appliance_gpu_count", "GPUs NVML reports", multiprocess_mode="livesum")
TEMPERATURE = _gauge("appliance_gpu_temperature_celsius", "GPU temperature")
SLOWDOWN = _gauge("appliance_gpu_temperature_slowdown_celsius", "The card's own slowdown threshold")
MEM_USED = _gauge("appliance_gpu_memory_used_bytes", "GPU memory allocated (NVML memory v2: without the driver's "
                  "reservation)")
MEM_TOTAL = _gauge("appliance_gpu_memory_total_bytes", "GPU memory in all")
MEM_RESERVED = _gauge("appliance_gpu_memory_reserved_bytes", "GPU memory the driver reserves")
UTIL = _gauge("appliance_gpu_utilization_ratio", "GPU utilisation, 0 to 1")
MEM_UTIL = _gauge("appliance_gpu_memory_utilization_ratio", "GPU memory bandwidth utilisation, 0 to 1")
POWER = _gauge("appliance_gpu_power_watts", "Power draw")
POWER_LIMIT = _gauge("appliance_gpu_power_limit_watts", "Enforced power limit")
SM_CLOCK = _gauge("appliance_gpu_sm_clock_hertz", "SM clock")
MEM_CLOCK = _gauge("appliance_gpu_memory_clock_hertz", "Memory clock")
THROTTLE = _gauge("appliance_gpu_throttle_reason", "1 while NVML reports this clock-event (throttle) reason",
                  ("gpu", "reason"))


def _set(gauge: Gauge, gpu: str, value, scale: float = 1.0) -> None:
    if value is not None:
        gauge.labels(gpu).set(value * scale)


def record(t: P.Telemetry) -> None:
    """One published sample."""
    UP.set(1)
    for source in SOURCES:
        SOURCE.labels(source).set(1 if source == t.source else 0)
    SAMPLES.labels("cpu_only" if t.cpu_only else "ok").inc()
    CPU_ONLY.set(1 if t.cpu_only else 0)
    COUNT.set(len(t.gpus))
    for g in t.gpus:
        gpu = str(g.index)
        _set(TEMPERATURE, gpu, g.temperature_c)
        _set(SLOWDOWN, gpu, g.temperature_slowdown_c)
        _set(MEM_USED, gpu, g.memory_used_mb, _MB)
        _set(MEM_TOTAL, gpu, g.memory_total_mb, _MB)
        _set(MEM_RESERVED, gpu, g.memory_reserved_mb, _MB)
        _set(UTIL, gpu, g.utilization_pct, 0.01)
        _set(MEM_UTIL, gpu, g.memory_utilization_pct, 0.01)
        _set(POWER, gpu, g.power_w)
        _set(POWER_LIMIT, gpu, g.power_limit_w)
        _set(SM_CLOCK, gpu, g.sm_clock_mhz, 1e6)
        _set(MEM_CLOCK, gpu, g.mem_clock_mhz, 1e6)
        if g.throttle_reasons is not None:
            active = {r if r in REASONS.values() else "other" for r in g.throttle_reasons}
            for reason in THROTTLE_REASONS:
                THROTTLE.labels(gpu, reason).set(1 if reason in active else 0)
