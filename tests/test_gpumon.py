"""GPU monitor: real pynvml where there is no GPU, recorded samples where there is one.

tests/data holds H200-like recordings in the JSON-lines sample format (appliance/gpu/
nvml.py; 143,771 MiB, 615.125 MiB reserved, 700 W limit, 77 W idle as measured there;
slowdown 89 °C and shutdown 92 °C as an H100/H200 SXM reports them):
h200-heat-ramp.jsonl: GPU 0 heats to 90 °C and back (sw_thermal from 87 °C, hw_thermal
and hw_slowdown at 90 °C), GPU 1 stays under 41 °C; h200-memory-climb.jsonl: a model
loads and its cache grows to 311 MiB free, another process (5151) arrives;
h200-power-cap.jsonl: the draw sits at the 700 W limit with sw_power_cap set.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pynvml
import pytest
import zmq

from appliance import protocol as P
from appliance.broker import routing
from appliance.config import load_settings
from appliance.gpu import monitor, processes, reasons
from appliance.gpu.nvml import RecordedNvml
from appliance.gpu.record import record, record_file
from conftest import wait_until

DATA = Path(__file__).parent / "data"
FILES = ["h200-heat-ramp.jsonl", "h200-memory-climb.jsonl", "h200-power-cap.jsonl"]

SAMPLES = {"devices": [{"name": "NVIDIA GeForce RTX 3090", "memory_total_mb": 24576, "samples": [
    {"memory_used_mb": 12000, "temperature_c": 49, "utilization_pct": 35},
    {"memory_used_mb": 20000, "temperature_c": 83, "utilization_pct": 99},
]}]}


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(SAMPLES))
    return path


def test_no_gpu_here_gives_a_cpu_only_state_with_the_reason(tmp_path):
    m = monitor.Monitor(load_settings({"APPLIANCE_HOME": str(tmp_path)}))  # the real pynvml
    t = m.sample()
    assert t.cpu_only and t.source == "none" and t.gpus == []
    assert "NVML" in t.reason


def test_recorded_samples_step_through(tmp_path, samples):
    m = monitor.Monitor(load_settings({"APPLIANCE_HOME": str(tmp_path), "NVML_SAMPLES": str(samples)}))
    first, second, third = m.sample(), m.sample(), m.sample()
    assert not first.cpu_only and first.source == "samples"
    g = first.gpus[0]
    assert (g.name, g.memory_total_mb, g.memory_used_mb, g.temperature_c) == ("NVIDIA GeForce RTX 3090", 24576,
                                                                              12000, 49)
    assert second.gpus[0].temperature_c == 83 and third.gpus[0].temperature_c == 49


def test_unreadable_samples_behave_like_missing_nvml(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    nvml = RecordedNvml(tmp_path / "bad.json")
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlInit()
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetCount()


def test_published_over_zeromq(tmp_path, samples):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "NVML_SAMPLES": str(samples), "GPUMON_INTERVAL_S": "0.1"})
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, P.TELEMETRY_TOPIC)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(s.telemetry_endpoint)
    stop = threading.Event()
    t = threading.Thread(target=monitor.serve, args=(s, monitor.Monitor(s), stop), daemon=True)
    t.start()
    try:
        assert sub.poll(5000), "no telemetry within 5 s"
        topic, payload = sub.recv_multipart()
        tel = P.telemetry.decode(payload)
        assert topic == P.TELEMETRY_TOPIC and tel.gpus[0].name == "NVIDIA GeForce RTX 3090"
    finally:
        stop.set()
        t.join(5)
        sub.close(0)
    assert not t.is_alive()


def opened(path, cls=RecordedNvml) -> RecordedNvml:
    nvml = cls(path)
    nvml.nvmlInit()
    return nvml


def replay(path, name_of=lambda pid: "") -> list[list[P.GpuReading]]:
    """Every line of a sample file as the monitor reads it."""
    nvml = opened(path)
    n = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
    return [monitor.read_all(nvml, name_of) for _ in range(n)]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("name", FILES)
def test_every_field_is_read_from_the_recorded_files(name):
    for line, readings in zip(lines(DATA / name), replay(DATA / name), strict=True):
        assert len(readings) == len(line["gpus"])
        for i, (want, got) in enumerate(zip(line["gpus"], readings)):
            assert got.index == i
            for key, value in want.items():
                if key == "processes":
                    assert [(p.pid, p.memory_mb) for p in got.processes] == [(p["pid"], p["memory_mb"])
                                                                              for p in value]
                else:
                    assert getattr(got, key) == value, key
            thermal, power, hardware = reasons.summary(want["throttle_reasons"])
            assert (got.throttle_thermal, got.throttle_power, got.throttle_hardware) == (thermal, power, hardware)
            assert got.memory_used_mb + got.memory_reserved_mb + got.memory_free_mb == got.memory_total_mb


def test_the_recorded_episodes_are_what_their_names_say():
    heat = replay(DATA / "h200-heat-ramp.jsonl")
    hot = [g[0] for g in heat if g[0].temperature_c >= 87]
    assert max(g[0].temperature_c for g in heat) == 90 and max(g[1].temperature_c for g in heat) <= 41
    assert hot and all(g.throttle_thermal and "sw_thermal" in g.throttle_reasons for g in hot)
    assert not any(g[0].throttle_thermal for g in heat if g[0].temperature_c < 87)
    assert heat[0][0].throttle_reasons == ["gpu_idle"] and heat[0][0].power_w == 77.0  # idle, as measured
    # routing's rule (THERMAL_LIMIT_C 85, THERMAL_RESUME_C 80): GPU 0 out and back in, GPU 1 never out
    states, was = [], [routing.Gpu(), routing.Gpu()]
    for gpus in heat:
        was = [routing.gpu_state(w, g, routing.Limits()) for w, g in zip(was, gpus)]
        states.append(tuple(w.throttled for w in was))
    assert (True, False) in states and states[-1] == (False, False) and not any(s[1] for s in states)

    climb = [g[0] for g in replay(DATA / "h200-memory-climb.jsonl")]
    used = [g.memory_used_mb for g in climb]
    assert used == sorted(used) and climb[-1].memory_free_mb / climb[-1].memory_total_mb < routing.LOW_MEMORY_FRACTION

    cap = [g[0] for g in replay(DATA / "h200-power-cap.jsonl")]
    capped = [g for g in cap if g.throttle_power]
    assert capped and all(abs(g.power_w - g.power_limit_w) <= 1.5 and g.throttle_reasons == ["sw_power_cap"]
                          and g.sm_clock_mhz < 1980 for g in capped)
    assert all(g.power_limit_w == 700.0 for g in cap) and not any(g.throttle_thermal for g in cap)


def test_v2_memory_used_excludes_what_the_driver_reserves():
    nvml = opened(DATA / "h200-heat-ramp.jsonl")
    h = nvml.nvmlDeviceGetHandleByIndex(0)  # idle: 0 MiB allocated, 615.125 MiB reserved
    v1, v2 = nvml.nvmlDeviceGetMemoryInfo(h), nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
    assert v1.used - v2.used == v2.reserved == 615.125 * 2**20 and v1.free == v2.free and v1.total == v2.total
    assert (v2.version, v2.total) == (pynvml.nvmlMemory_v2, v2.used + v2.reserved + v2.free)
    g = monitor.read_all(opened(DATA / "h200-heat-ramp.jsonl"), lambda pid: "")[0]
    assert (g.memory_used_mb, g.memory_reserved_mb) == (0.0, 615.125)  # nvidia-smi's figures, not v1's 615

    class NoV2(RecordedNvml):  # an NVML (or pynvml) without the second memory query
        nvmlMemory_v2 = None
    g = monitor.read_all(opened(DATA / "h200-heat-ramp.jsonl", NoV2), lambda pid: "")[0]
    assert (g.memory_used_mb, g.memory_reserved_mb, g.memory_free_mb) == (615.125, None, 143155.875)


BARE = {"name": "NVIDIA GeForce GTX 1080", "memory_total_mb": 8192, "memory_used_mb": 1024,
        "temperature_c": 51, "utilization_pct": 20, "power_w": None}  # absent or null: not supported


def test_what_a_card_cannot_give_is_absent_not_a_crash(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps({"t": 0, "gpus": [BARE]}) + "\n")
    m = monitor.Monitor(load_settings({"APPLIANCE_HOME": str(tmp_path), "NVML_SAMPLES": str(path)}))
    t = m.sample()
    assert not t.cpu_only, t.reason
    g = t.gpus[0]
    assert (g.name, g.memory_used_mb, g.memory_free_mb, g.temperature_c, g.utilization_pct) == (
        "NVIDIA GeForce GTX 1080", 1024, 7168, 51, 20)
    assert g.uuid == "" and g.memory_reserved_mb == 0
    absent = ["power_w", "power_limit_w", "sm_clock_mhz", "mem_clock_mhz", "temperature_slowdown_c",
              "temperature_shutdown_c", "throttle_reasons", "throttle_thermal", "throttle_power",
              "throttle_hardware", "processes"]
    assert all(getattr(g, key) is None for key in absent)
    on_the_wire = msgspec.msgpack.decode(P.encode(t))[5][0]  # Telemetry is an array; its GPUs are maps
    assert not set(absent) & set(on_the_wire) and "uuid" not in on_the_wire
    assert P.telemetry.decode(P.encode(t)) == t


def test_pynvml_s_own_errors_not_supported_is_absent_and_a_lost_gpu_fails_the_sample(tmp_path):
    def raising(code):
        def call(*args, **kwargs):
            raise pynvml.NVMLError(code)  # pynvml maps the code to its subclass (NVMLError_NotSupported, ...)
        return call
    nvml = opened(DATA / "h200-power-cap.jsonl")
    nvml.NVMLError = pynvml.NVMLError
    nvml.nvmlDeviceGetPowerUsage = raising(pynvml.NVML_ERROR_NOT_SUPPORTED)
    nvml.nvmlDeviceGetComputeRunningProcesses = raising(pynvml.NVML_ERROR_NO_PERMISSION)
    nvml.nvmlDeviceGetUtilizationRates = raising(pynvml.NVML_ERROR_NOT_SUPPORTED)  # as in MIG mode
    g = monitor.read_all(nvml, lambda pid: "")[0]
    assert g.power_w is None and g.processes is None and g.memory_utilization_pct is None
    assert g.utilization_pct == 0 and g.power_limit_w == 700.0  # the rest is read

    m = monitor.Monitor(load_settings({"APPLIANCE_HOME": str(tmp_path)}), nvml=nvml)
    nvml.nvmlDeviceGetTemperature = raising(pynvml.NVML_ERROR_GPU_IS_LOST)
    t = m.sample()
    assert t.cpu_only and t.gpus == [] and t.reason == "NVML read failed: GPU is lost"


def test_clock_event_reasons_are_decoded():
    assert reasons.decode(0) == []
    assert reasons.decode(pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonSwPowerCap
                          | pynvml.nvmlClocksEventReasonGpuIdle) == ["gpu_idle", "sw_power_cap", "sw_thermal"]
    assert reasons.decode(pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown | 0x8000) == ["hw_power_brake",
                                                                                           "0x8000"]
    assert reasons.summary(["hw_power_brake"]) == (False, True, True)
    assert reasons.summary(["gpu_idle", "sync_boost"]) == (False, False, False)
    pynvml_names = {"gpu_idle": "GpuIdle", "applications_clocks_setting": "ApplicationsClocksSetting",
                    "sw_power_cap": "SwPowerCap", "hw_slowdown": "HwSlowdown", "sync_boost": "SyncBoost",
                    "sw_thermal": "SwThermalSlowdown", "hw_thermal": "HwThermalSlowdown",
                    "hw_power_brake": "HwPowerBrakeSlowdown", "display_clock_setting": "DisplayClockSetting",
                    "board_limit": "BoardLimit", "reliability": "Reliability"}
    for bit, name in reasons.REASONS.items():  # the table is pynvml's, bit for bit
        assert getattr(pynvml, "nvmlClocksThrottleReason" + pynvml_names[name]) == bit
        assert getattr(pynvml, "nvmlClocksEventReason" + pynvml_names[name], bit) == bit  # the newer names

    class OldDriver(RecordedNvml):  # NVML without the ...EventReasons symbol: the older name is used
        def nvmlDeviceGetCurrentClocksEventReasons(self, h):
            raise self.NVMLError_FunctionNotFound()
    nvml = opened(DATA / "h200-power-cap.jsonl", OldDriver)
    readings = [monitor.read_all(nvml, lambda pid: "")[0] for _ in range(5)]
    assert readings[-1].throttle_reasons == ["sw_power_cap"] and readings[-1].throttle_power


def fake_proc(root: Path, pid: int, ppid: int, argv: list[str]) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (root / str(pid) / "stat").write_text(f"{pid} (odd (name) here) S {ppid} {pid} {pid} 0 -1\n")


def test_per_process_memory_is_mapped_to_instance_names(tmp_path):
    proc = tmp_path / "proc"
    fake_proc(proc, 4242, 900, ["/venv/bin/python", "-m", "procs.llama", "llama-0"])  # llama.cpp in-process
    fake_proc(proc, 4300, 4343, ["/opt/llama-server", "--port", "0"])  # a launcher's llama-server child
    fake_proc(proc, 4343, 900, ["python", "-m", "procs.llama", "3"])  # the former `procs.llama N`
    fake_proc(proc, 5151, 1, ["python", "train.py"])
    fake_proc(proc, 900, 1, ["supervisord", "-n"])
    nvml = opened(DATA / "h200-memory-climb.jsonl")
    for _ in range(7):
        g = monitor.read_all(nvml, lambda pid: processes.instance_of(pid, proc=proc))[0]
    assert [(p.pid, p.memory_mb, p.instance) for p in g.processes] == [(4242, 126976.0 - 8192, "llama-0"),
                                                                       (5151, 8192.0, "")]
    assert processes.instance_of(4300, proc=proc) == "llama-3"
    assert processes.instance_of(4300, {4343: "from-the-dict"}, proc=proc) == "from-the-dict"
    assert processes.instance_of(4242, {4343: "x"}, proc=proc) == ""  # the dict, not command lines, decides
    assert processes.instance_of(77777, proc=proc) == ""  # gone meanwhile
    assert processes.launcher_name(["python", "-m", "procs.llama"]) == "llama-0"  # procs/llama.py's default


def test_a_real_launcher_process_is_found_by_its_command_line():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-m", "procs.llama", "llama-7"],
                             stdin=subprocess.PIPE)
    try:  # polled: right after a vfork+exec, /proc shows the new command line a moment late
        wait_until(lambda: processes.instance_of(child.pid) == "llama-7", 5, 0.01, "the launcher's command line")
        assert processes.instance_of(os.getpid()) == ""
    finally:
        child.communicate(b"")


class Clock:
    """time.monotonic and time.sleep for the recorder, without waiting."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s + 0.01  # a little late, as a real sleep is


@pytest.mark.parametrize("name", FILES)
def test_record_then_replay_gives_the_same_readings(tmp_path, name):
    source = opened(DATA / name)
    n = len(lines(DATA / name))
    out = io.StringIO()
    clock = Clock()
    assert record(source, out, seconds=n * 2.0 - 1, interval=2.0, clock=clock, sleep=clock.sleep) == n
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text(out.getvalue())
    late = [round(line["t"] - 2.0 * i, 3) for i, line in enumerate(lines(recorded))]
    assert late == [0.0] + [0.01] * (n - 1)  # each sleep was late, but on a fixed grid it does not add up
    assert replay(recorded) == replay(DATA / name)
    again, clock = io.StringIO(), Clock()
    record(opened(recorded), again, seconds=n * 2.0 - 1, interval=2.0, clock=clock, sleep=clock.sleep)
    assert [line["gpus"] for line in map(json.loads, again.getvalue().splitlines())] == [
        line["gpus"] for line in lines(recorded)]  # a recording of a recording is the same file


def test_record_file_writes_what_recorded_nvml_replays(tmp_path):
    out = tmp_path / "bare.jsonl"
    (tmp_path / "in.jsonl").write_text(json.dumps({"t": 0, "gpus": [BARE, BARE]}) + "\n")
    assert record_file(out, seconds=0, nvml=RecordedNvml(tmp_path / "in.jsonl")) == (1, 2)
    assert replay(out) == replay(tmp_path / "in.jsonl")
    assert set(lines(out)[0]["gpus"][0]) == {"name", "memory_total_mb", "memory_used_mb", "memory_reserved_mb",
                                             "memory_free_mb", "temperature_c", "utilization_pct",
                                             "memory_utilization_pct"}  # what the card lacks stays absent


def test_gpu_record_without_nvml_fails_with_one_clear_line(tmp_path):
    out = tmp_path / "rec.jsonl"
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "gpu", "record", "--seconds", "1", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("appliance: gpu record: NVML unavailable"), r.stderr
    assert not out.exists()


def test_old_telemetry_still_decodes():
    class GpuReading(msgspec.Struct):  # the fields before this change
        index: int
        name: str
        memory_total_mb: float
        memory_used_mb: float
        temperature_c: float
        utilization_pct: float

    class Telemetry(msgspec.Struct, tag=True, array_like=True):
        ts: float
        source: str
        cpu_only: bool
        reason: str
        gpus: list[GpuReading]
    old = msgspec.msgpack.encode(Telemetry(1.0, "nvml", False, "", [GpuReading(0, "H200", 143771, 5234.8, 40, 3)]))
    g = P.telemetry.decode(old).gpus[0]
    assert (g.memory_used_mb, g.uuid, g.power_w, g.processes) == (5234.8, "", None, None)
