"""GPU monitor: real pynvml where there is no GPU, recorded samples where there is one."""
from __future__ import annotations

import json
import threading

import pytest
import zmq

from appliance import protocol as P
from appliance.config import load_settings
from appliance.gpu import monitor
from appliance.gpu.nvml import RecordedNvml

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
