"""`appliance gpu record`: real NVML readings written as the samples RecordedNvml replays.

Why: tests and CPU-only machines replay what a real card did (a heat episode, a power
cap) instead of made-up figures. A line is built from the monitor's own GpuReading,
so the recording holds exactly what the monitor would publish, in the sample format
(appliance/gpu/nvml.py): what the card cannot give stays absent, and replaying a
recording gives the same readings again. Instance names are not recorded: they are
mapped afresh on replay.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import msgspec

from .. import protocol as P
from .monitor import read_all

_DERIVED = ("index", "throttle_thermal", "throttle_power", "throttle_hardware")  # replay derives them


class RecordError(Exception):
    """Nothing to record (no NVML, no GPU) or NVML failed midway: one line for the operator."""


def sample_line(t: float, readings: list[P.GpuReading]) -> str:
    gpus = []
    for g in readings:
        d = msgspec.to_builtins(g)  # omit_defaults: a reading NVML could not give stays absent
        for key in _DERIVED:
            d.pop(key, None)
        for proc in d.get("processes", []):
            proc.pop("instance", None)
        gpus.append(d)
    return json.dumps({"t": round(t, 3), "gpus": gpus}, separators=(",", ":"))


def record(nvml, out: TextIO, seconds: float, interval: float = 1.0,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
           progress: Callable[[int, float], None] | None = None) -> int:
    """Write one line per `interval` for `seconds` (at least one); NVML already initialised.
    Returns the lines written. `progress(lines, seconds)` is called after each line."""
    start = clock()
    n = 0
    try:
        while True:
            t = clock() - start
            try:
                readings = read_all(nvml, lambda pid: "")
            except nvml.NVMLError as exc:
                raise RecordError(f"NVML read failed after {n} samples: {exc}") from None
            out.write(sample_line(t, readings) + "\n")
            out.flush()  # a recording cut short keeps what it has
            n += 1
            if progress is not None:
                progress(n, t)
            if n * interval >= seconds:
                return n
            sleep(max(n * interval - (clock() - start), 0.0))  # on a fixed grid: slow reads do not drift it
    except KeyboardInterrupt:  # Ctrl-C ends a recording early; what was written stands
        return n


def record_file(path: str | Path, seconds: float, interval: float = 1.0, nvml=None,
                progress: Callable[[int, float], None] | None = None) -> tuple[int, int]:
    """Record real NVML (or `nvml`) to `path`: (samples, GPUs). RecordError says why not."""
    if not interval > 0 or not seconds >= 0:
        raise RecordError(f"--interval must be above 0 and --seconds not below ({interval=:g}, {seconds=:g})")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            raise RecordError(f"no NVML: {exc}") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise RecordError(f"NVML unavailable ({exc}): no GPU to record on this machine") from None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise RecordError("NVML reports no GPUs: nothing to record")
        with open(path, "w", encoding="utf-8") as out:
            return record(nvml, out, seconds, interval, progress=progress), count
    except nvml.NVMLError as exc:
        raise RecordError(f"NVML failed: {exc}") from None
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
