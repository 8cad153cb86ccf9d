"""NVML sources behind one interface: the real `pynvml`, or recorded samples.

Why a recorded source: tests and CPU-only machines have no GPU, but the monitor's
code path (init, device count, memory, temperature, utilization, errors) must still
run. RecordedNvml answers the same calls as pynvml from a JSON file of samples taken
on a real card, stepping to the next sample on each full read of device 0. When the
file changes it is read again: a test can make a GPU heat up or cool down.

Sample file format:
    {"devices": [{"name": "NVIDIA GeForce RTX 3090", "memory_total_mb": 24576,
                  "samples": [{"memory_used_mb": 12000, "temperature_c": 49,
                               "utilization_pct": 35}, ...]}]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def load_nvml(samples_path: str = ""):
    if samples_path:
        return RecordedNvml(samples_path)
    import pynvml  # from nvidia-ml-py

    return pynvml


class RecordedNvmlError(Exception):
    pass


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


class RecordedNvml:
    NVMLError = RecordedNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._devices: list[dict] = []
        self._step = 0
        self._initialised = False

    def nvmlInit(self) -> None:
        try:
            self._mtime = self._path.stat().st_mtime_ns
            data = json.loads(self._path.read_text())
            devices = data["devices"]
            for d in devices:
                if not d["samples"]:
                    raise ValueError(f"device {d.get('name')!r} has no samples")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecordedNvmlError(f"recorded samples {self._path}: {exc}") from None
        self._devices = devices
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self._initialised = False

    def _check(self) -> None:
        if not self._initialised:
            raise RecordedNvmlError("Uninitialized")

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        try:
            if self._path.stat().st_mtime_ns != self._mtime:
                self.nvmlInit()
        except OSError:
            pass  # gone for a moment (being replaced): the last samples stand
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        if not 0 <= index < len(self._devices):
            raise RecordedNvmlError("Invalid Argument")
        if index == 0:
            self._step += 1
        return index

    def _sample(self, h: int) -> dict:
        samples = self._devices[h]["samples"]
        return samples[(self._step - 1) % len(samples)]

    def nvmlDeviceGetName(self, h: int) -> str:
        return self._devices[h]["name"]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Memory:
        total = int(self._devices[h]["memory_total_mb"] * 2**20)
        used = int(self._sample(h)["memory_used_mb"] * 2**20)
        return _Memory(total=total, used=used, free=total - used)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._sample(h)["temperature_c"])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Utilization:
        return _Utilization(gpu=int(self._sample(h)["utilization_pct"]), memory=0)
