"""GPU monitor: reads NVML every interval and publishes Telemetry on a PUB socket.

Without a GPU (or without the NVML library) it says so: it keeps publishing a
`cpu_only` state with the reason, so that consumers never mistake silence for health.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from .nvml import RecordedNvml, load_nvml

log = logging.getLogger("appliance.gpumon")


def read_all(nvml) -> list[P.GpuReading]:
    readings = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        readings.append(P.GpuReading(
            index=i,
            name=name.decode() if isinstance(name, bytes) else str(name),
            memory_total_mb=mem.total / 2**20,
            memory_used_mb=mem.used / 2**20,
            temperature_c=float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            utilization_pct=float(util.gpu),
        ))
    return readings


class Monitor:
    def __init__(self, settings: Settings, nvml=None):
        self.s = settings
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
            gpus = read_all(self.nvml)
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
            pub.send_multipart([P.TELEMETRY_TOPIC, P.encode(monitor.sample())])
            stop.wait(settings.gpumon_interval_s)
    finally:
        pub.close(0)


def main(settings: Settings) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(settings, Monitor(settings), stop)
