"""GPU monitor: reads NVML every interval and publishes Telemetry on a PUB socket.

Without a GPU (or without the NVML library) it says so: it keeps publishing a
`cpu_only` state with the reason, so that consumers never mistake silence for health.
A reading a card cannot give (not supported, no permission, a call the driver lacks)
is absent from its GpuReading; any other NVML error fails the whole sample, which
then says why.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from . import metrics, processes, reasons
from .nvml import RecordedNvml, load_nvml

log = logging.getLogger("appliance.gpumon")

# nvml.h error codes that mean "this card or driver cannot give that reading": not
# supported, no permission, function not found (an older driver), version mismatch.
_ABSENT = frozenset({3, 4, 13, 25})


def _maybe(nvml, fn: Callable | None, *args, **kwargs):
    """fn(*args), or None where the card cannot give it."""
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) in _ABSENT:
            return None
        raise


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory(nvml, h):
    """(used, reserved, free, total) in bytes: v2 where there is one, because v1's used
    counts the driver's reservation (615 MiB on an H200); reserved None without v2."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    mem = _maybe(nvml, nvml.nvmlDeviceGetMemoryInfo, h, version=version) if version else None
    if mem is not None:
        return mem.used, mem.reserved, mem.free, mem.total
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    return mem.used, None, mem.free, mem.total


def _clock_events(nvml, h) -> int | None:
    """The reasons bitmask; the older ...ThrottleReasons name on drivers without the new one."""
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        mask = _maybe(nvml, getattr(nvml, name, None), h)
        if mask is not None:
            return mask
    return None


def _processes(nvml, h, name_of: Callable[[int], str]) -> list[P.GpuProcess] | None:
    try:
        procs = _maybe(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, h)
    except getattr(nvml, "NVMLLibraryMismatchError", ()):  # pynvml's, for a driver without _v3
        procs = _maybe(nvml, getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v2", None), h)
    if procs is None:
        return None
    return [P.GpuProcess(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory / 2**20, name_of(p.pid))
            for p in procs]


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else milliwatts / 1000


def read_gpu(nvml, i: int, name_of: Callable[[int], str] = processes.instance_of) -> P.GpuReading:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    used, reserved, free, total = _memory(nvml, h)
    util = _maybe(nvml, nvml.nvmlDeviceGetUtilizationRates, h)
    # nvmlDeviceGetTemperature works on every driver; pynvml 13 marks it deprecated for ...V
    temp_fn = getattr(nvml, "nvmlDeviceGetTemperature", None) or getattr(nvml, "nvmlDeviceGetTemperatureV", None)
    temp = _maybe(nvml, temp_fn, h, nvml.NVML_TEMPERATURE_GPU)
    slowdown = _maybe(nvml, nvml.nvmlDeviceGetTemperatureThreshold, h, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
    shutdown = _maybe(nvml, nvml.nvmlDeviceGetTemperatureThreshold, h, nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
    mask = _clock_events(nvml, h)
    names = None if mask is None else reasons.decode(mask)
    thermal, power, hardware = (None, None, None) if names is None else reasons.summary(names)
    return P.GpuReading(
        index=i,
        name=_str(_maybe(nvml, nvml.nvmlDeviceGetName, h) or ""),
        memory_total_mb=total / 2**20,
        memory_used_mb=used / 2**20,
        temperature_c=float(temp or 0),
        utilization_pct=float(util.gpu if util is not None else 0),
        uuid=_str(_maybe(nvml, nvml.nvmlDeviceGetUUID, h) or ""),
        memory_reserved_mb=None if reserved is None else reserved / 2**20,
        memory_free_mb=free / 2**20,
        memory_utilization_pct=None if util is None else float(util.memory),
        temperature_slowdown_c=None if slowdown is None else float(slowdown),
        temperature_shutdown_c=None if shutdown is None else float(shutdown),
        power_w=_watts(_maybe(nvml, nvml.nvmlDeviceGetPowerUsage, h)),
        power_limit_w=_watts(_maybe(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, h)),
        sm_clock_mhz=_maybe(nvml, nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM),
        mem_clock_mhz=_maybe(nvml, nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_MEM),
        throttle_reasons=names,
        throttle_thermal=thermal,
        throttle_power=power,
        throttle_hardware=hardware,
        processes=_processes(nvml, h, name_of),
    )


def read_all(nvml, name_of: Callable[[int], str] = processes.instance_of) -> list[P.GpuReading]:
    """Every GPU's readings; `name_of` maps a PID to its appliance instance."""
    return [read_gpu(nvml, i, name_of) for i in range(nvml.nvmlDeviceGetCount())]


class Monitor:
    def __init__(self, settings: Settings, nvml=None, name_of: Callable[[int], str] = processes.instance_of):
        self.s = settings
        self.name_of = name_of
        self.nvml = nvml if nvml is not None else load_nvml(settings.nvml_samples)
        self.source = "samples" if isinstance(self.nvml, RecordedNvml) else "nvml"
        self.reason = ""
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            self.reason = f"NVML unavailable: {exc}"
            self.source = "none"
            log.warning("no GPU: %s; publishing a CPU-only state", self.reason)

    def sample(self) -> P.Telemetry:
        if self.source == "none":
            return P.Telemetry(time.time(), "none", True, self.reason, [])
        try:
            gpus = read_all(self.nvml, self.name_of)
        except self.nvml.NVMLError as exc:
            return P.Telemetry(time.time(), self.source, True, f"NVML read failed: {exc}", [])
        if not gpus:
            return P.Telemetry(time.time(), self.source, True, "NVML reports no devices", [])
        return P.Telemetry(time.time(), self.source, False, "", gpus)


def serve(settings: Settings, monitor: Monitor, stop: threading.Event) -> None:
    """Publish one sample per interval until `stop` is set."""
    ensure_dirs(settings)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(settings.telemetry_endpoint)
    log.info("gpumon up: source=%s, every %.1fs on %s", monitor.source, settings.gpumon_interval_s,
             settings.telemetry_endpoint)
    try:
        while not stop.is_set():
            sample = monitor.sample()
            pub.send_multipart([P.TELEMETRY_TOPIC, P.encode(sample)])
            metrics.record(sample)
            stop.wait(settings.gpumon_interval_s)
    finally:
        pub.close(0)


def main(settings: Settings) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(settings, Monitor(settings), stop)
