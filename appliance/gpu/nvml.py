"""NVML sources behind one interface: the real `pynvml`, or recorded samples.

Why a recorded source: tests and CPU-only machines have no GPU, but the monitor's
code path (every NVML call it makes, its errors, cards that lack a reading) must still
run. RecordedNvml answers the same calls as pynvml (nvidia-ml-py 13.x: names,
arguments, return shapes and units, NVML constants and error codes) from a file of
samples, stepping to the next sample on each full read of device 0. When the file
changes it is read again: a test can make a GPU heat up or cool down.

Sample file, JSON lines (what `appliance gpu record` writes): one line per sample time,
    {"t": 0.0, "gpus": [{"name": "NVIDIA H200", "memory_total_mb": 143771, ...}, ...]}
`t` is seconds since the recording began (replay steps per read, not by clock). A GPU's
keys are GpuReading's field names (appliance/protocol.py) and units: memory_*_mb (MiB),
utilization_pct, memory_utilization_pct, temperature_c, temperature_slowdown_c,
temperature_shutdown_c, power_w, power_limit_w, sm_clock_mhz, mem_clock_mhz,
throttle_reasons (names, as the monitor decodes them), processes [{pid, memory_mb}].
A key absent or null is a reading the card does not support (NVMLError_NotSupported).
The older format, {"devices": [{"name", "memory_total_mb", "samples": [{...}]}]}, is
still read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .reasons import REASON_BITS


def load_nvml(samples_path: str = ""):
    if samples_path:
        return RecordedNvml(samples_path)
    import pynvml  # from nvidia-ml-py

    return pynvml


# nvml.h's error codes, as pynvml names them
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_UNKNOWN = 999


class RecordedNvmlError(Exception):
    """pynvml.NVMLError's shape: `value` is the NVML error code."""

    value = NVML_ERROR_UNKNOWN


class RecordedNotSupported(RecordedNvmlError):
    value = NVML_ERROR_NOT_SUPPORTED

    def __str__(self) -> str:
        return "Not Supported"


class RecordedFunctionNotFound(RecordedNvmlError):
    value = NVML_ERROR_FUNCTION_NOT_FOUND

    def __str__(self) -> str:
        return "Function Not Found"


@dataclass
class _Memory:  # c_nvmlMemory_t
    total: int
    free: int
    used: int


@dataclass
class _MemoryV2:  # c_nvmlMemory_v2_t
    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass
class _Utilization:  # c_nvmlUtilization_t
    gpu: int
    memory: int


@dataclass
class _Process:  # pynvml's friendly object of c_nvmlProcessInfo_v3_t
    pid: int
    usedGpuMemory: int | None  # noqa: N815 (pynvml's name); None where NVML cannot say
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815 (not a MIG instance)
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


def _bytes(mib: float) -> int:
    return int(round(mib * 2**20))


def parse_samples(text: str) -> list[list[dict]]:
    """Per device, its samples in order (each a dict of GpuReading's keys)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # several lines: JSON lines
    if isinstance(whole, dict) and "devices" in whole:  # the older format
        devices = []
        for d in whole["devices"]:
            if not d["samples"]:
                raise ValueError(f"device {d.get('name')!r} has no samples")
            devices.append([{"name": d["name"], "memory_total_mb": d["memory_total_mb"], **s}
                            for s in d["samples"]])
        return devices
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                gpus = json.loads(line)["gpus"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"line {n}: {exc!r}") from None
            if not isinstance(gpus, list) or not all(isinstance(g, dict) for g in gpus):
                raise ValueError(f"line {n}: `gpus` is not a list of objects")
            if lines and len(gpus) != len(lines[0]):
                raise ValueError(f"line {n}: {len(gpus)} GPUs where the first line has {len(lines[0])}")
            lines.append(gpus)
    if not lines:
        raise ValueError("no samples")
    return [[gpus[i] for gpus in lines] for i in range(len(lines[0]))]


class RecordedNvml:
    """pynvml's calls (those the monitor makes), answered from a sample file."""

    NVMLError = RecordedNvmlError
    NVMLError_NotSupported = RecordedNotSupported
    NVMLError_FunctionNotFound = RecordedFunctionNotFound
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    nvmlMemory_v2 = 0x02000028

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._devices: list[list[dict]] = []
        self._step = 0
        self._initialised = False

    def nvmlInit(self) -> None:
        try:
            self._mtime = self._path.stat().st_mtime_ns
            devices = parse_samples(self._path.read_text())
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

    def _get(self, h: int, key: str):
        """The current sample's value; absent or null: the card does not support it."""
        samples = self._devices[h]
        value = samples[(self._step - 1) % len(samples)].get(key)
        if value is None:
            raise RecordedNotSupported()
        return value

    def nvmlDeviceGetName(self, h: int) -> str:
        return str(self._get(h, "name"))

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return str(self._get(h, "uuid"))

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> _Memory | _MemoryV2:
        """v1 counts the driver's reservation as used, v2 reports it apart: as NVML does."""
        total, used = _bytes(self._get(h, "memory_total_mb")), _bytes(self._get(h, "memory_used_mb"))
        try:
            reserved = _bytes(self._get(h, "memory_reserved_mb"))
        except RecordedNotSupported:
            reserved = 0
        try:
            free = _bytes(self._get(h, "memory_free_mb"))
        except RecordedNotSupported:
            free = total - reserved - used
        if not version:
            return _Memory(total=total, free=free, used=total - free)
        if version != self.nvmlMemory_v2:
            raise RecordedNvmlError("Argument Version Mismatch")
        return _MemoryV2(version=version, total=total, reserved=reserved, free=free, used=used)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._get(h, "temperature_c"))

    def nvmlDeviceGetTemperatureThreshold(self, h: int, threshold: int) -> int:
        key = {self.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: "temperature_slowdown_c",
               self.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: "temperature_shutdown_c"}.get(threshold)
        if key is None:
            raise RecordedNotSupported()
        return int(self._get(h, key))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Utilization:
        gpu = int(self._get(h, "utilization_pct"))
        try:
            memory = int(self._get(h, "memory_utilization_pct"))
        except RecordedNotSupported:
            memory = 0  # NVML gives both or neither
        return _Utilization(gpu=gpu, memory=memory)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return int(round(self._get(h, "power_w") * 1000))  # milliwatts, as NVML

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return int(round(self._get(h, "power_limit_w") * 1000))

    def nvmlDeviceGetClockInfo(self, h: int, type: int) -> int:  # noqa: A002 (pynvml's name)
        key = {self.NVML_CLOCK_SM: "sm_clock_mhz", self.NVML_CLOCK_MEM: "mem_clock_mhz"}.get(type)
        if key is None:
            raise RecordedNotSupported()
        return int(self._get(h, key))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        """The bitmask back from the names (an unknown bit is recorded as `0x...`)."""
        mask = 0
        for name in self._get(h, "throttle_reasons"):
            mask |= REASON_BITS[name] if name in REASON_BITS else int(name, 16)
        return mask

    nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons  # the older name

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[_Process]:
        return [_Process(pid=int(p["pid"]),
                         usedGpuMemory=None if p.get("memory_mb") is None else _bytes(p["memory_mb"]))
                for p in self._get(h, "processes")]
