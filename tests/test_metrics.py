"""Prometheus metrics: every process's figures in one /metrics, against the running appliance
(two gunicorn workers, broker, gpumon on recorded NVML readings, llama.cpp on the tiny model),
and docs/METRICS.md kept exact by checking the exposition against its tables."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import falcon.testing
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, running_appliance, wait_until

CHAT = {"type": "chat", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]}
TASK_ID = re.compile(r"[0-9a-f]{32}")
GPU = {"name": "NVIDIA H200", "uuid": "GPU-0", "memory_total_mb": 143771.0, "memory_used_mb": 20480.0,
       "memory_reserved_mb": 615.125, "memory_free_mb": 143771.0 - 615.125 - 20480.0, "utilization_pct": 40,
       "memory_utilization_pct": 10, "temperature_c": 51, "temperature_slowdown_c": 89, "temperature_shutdown_c": 92,
       "power_w": 300.5, "power_limit_w": 700.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 3201,
       "throttle_reasons": ["sw_power_cap"], "processes": []}


REMOTE = "192.0.2.77"  # TEST-NET-1: never routed, so never someone else's


@pytest.fixture
def remote_address():
    """An address that is not loopback, on this host's lo for the test (as root, which the
    suite is: test_storage_faults mounts filesystems): a caller from it is "from afar"
    to the OPS rule, whatever network this machine has."""
    out = subprocess.run(["ip", "addr", "add", f"{REMOTE}/32", "dev", "lo"], capture_output=True, text=True)
    assert out.returncode == 0, f"cannot add {REMOTE} to lo (the test needs root): {out.stderr}"
    try:
        yield REMOTE
    finally:
        subprocess.run(["ip", "addr", "del", f"{REMOTE}/32", "dev", "lo"], capture_output=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    samples = tmp_path_factory.mktemp("nvml") / "nvml.jsonl"
    samples.write_text(json.dumps({"t": 0, "gpus": [GPU]}) + "\n")
    with running_appliance(tmp_path_factory, API_WORKERS="2", API_HOST="0.0.0.0", NVML_SAMPLES=str(samples)) as a:
        a.metrics_dir = Path(a.settings().run_dir) / "metrics"
        yield a


class Scrape:
    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def values(self, name: str, **labels: str) -> list[float]:
        return [s.value for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples that have these labels (0 when there are none)."""
        return sum(self.values(name, **labels))


def scrape(app) -> Scrape:
    r = requests.get(app.url + "/metrics", timeout=10)  # loopback, no token: the OPS rule lets it in
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.text)


def run_tasks(app, n: int) -> list[dict]:
    ids = []
    for _ in range(n):
        r = app.post("/v1/async/submit", json=CHAT)
        assert r.status_code == 202, r.text
        ids.append(r.json()["task_id"])

    def result(task_id):
        r = app.get(f"/v1/async/result/{task_id}")
        return r.json() if r.status_code == 200 else None
    return [wait_until(lambda: result(t), 60, 0.05, f"task {t}") for t in ids]


def live_gauge_pids(directory: Path) -> set[int]:
    return {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("gauge_live*_*.db")}


def supervised_pid(app, program: str) -> int:
    out = app.ctl("pid", program).stdout.strip()
    assert out.isdigit(), out
    return int(out)


# ------------------------------------------------------------------ the whole appliance


def test_one_scrape_shows_every_process(app):
    before = scrape(app)
    done = run_tasks(app, 3)
    assert all(d["state"] == "completed" for d in done), done
    generated = sum(d["result"]["timings"]["predicted_n"] for d in done)
    want = before.value("appliance_instance_generated_tokens_total", instance="llama-0") + generated
    # the worker loop counts a Done just after forwarding it: give it a moment
    wait_until(lambda: scrape(app).value("appliance_instance_generated_tokens_total", instance="llama-0") == want,
               5, 0.1, "generated tokens counted")
    def refreshed():  # the broker sets its gauges once a second
        m = scrape(app)
        return m.value("appliance_broker_workers", state="ready") == 1 and m.value("appliance_broker_running_tasks") == 0
    wait_until(refreshed, 5, 0.1, "broker gauges refreshed")
    m = scrape(app)
    assert len(re.findall(r"^# TYPE ", m.text, re.M)) == len(m.families)  # each family once

    # api
    assert m.value("appliance_api_requests_total", route="/v1/async/submit", method="POST", status="202") >= 3
    assert m.value("appliance_api_request_duration_seconds_count", route="/v1/async/submit", method="POST") >= 3
    # broker
    assert m.value("appliance_broker_up") == 1
    assert m.value("appliance_broker_tasks_finished_total", state="completed", error_code="none") - \
        before.value("appliance_broker_tasks_finished_total", state="completed", error_code="none") == 3
    assert m.value("appliance_broker_tasks_accepted_total") - before.value("appliance_broker_tasks_accepted_total") == 3
    assert m.value("appliance_broker_dispatch_latency_seconds_count") - \
        before.value("appliance_broker_dispatch_latency_seconds_count") == 3
    assert m.value("appliance_broker_journal_commit_seconds_count") > 0
    assert m.value("appliance_broker_queue_depth", priority="normal", model="appliance-tiny") == 0
    assert len(m.values("appliance_broker_queue_depth")) == 5  # every priority of the one model
    assert m.value("appliance_broker_health_state", state="healthy") == 1
    assert m.value("appliance_broker_health_state") == 1  # one-hot
    assert m.value("appliance_broker_workers", state="ready") == 1
    assert m.value("appliance_broker_worker_slots") == 2
    # gpumon, on the recorded H200
    assert m.value("appliance_gpumon_up") == 1 and m.value("appliance_gpu_cpu_only") == 0
    assert m.value("appliance_gpumon_source", source="samples") == 1 and m.value("appliance_gpumon_source") == 1
    assert m.value("appliance_gpu_temperature_celsius", gpu="0") == 51
    assert m.value("appliance_gpu_memory_used_bytes", gpu="0") == 20480 * 2**20
    assert m.value("appliance_gpu_memory_reserved_bytes", gpu="0") == 615.125 * 2**20
    assert m.value("appliance_gpu_utilization_ratio", gpu="0") == pytest.approx(0.4)
    assert m.value("appliance_gpu_power_watts", gpu="0") == 300.5
    assert m.value("appliance_gpu_sm_clock_hertz", gpu="0") == 1.98e9
    assert m.value("appliance_gpu_throttle_reason", gpu="0", reason="sw_power_cap") == 1
    assert m.value("appliance_gpu_throttle_reason", gpu="0", reason="sw_thermal") == 0
    # the instance, from its launcher and worker loop
    assert m.value("appliance_instance_up", instance="llama-0") == 1
    assert m.value("appliance_instance_slots", instance="llama-0") == 2
    assert m.value("appliance_instance_slots_busy", instance="llama-0") == 0
    assert m.value("appliance_instance_starts_total", instance="llama-0") == 1
    assert m.value("appliance_instance_tasks_total", instance="llama-0", outcome="ok") - \
        before.value("appliance_instance_tasks_total", instance="llama-0", outcome="ok") == 3
    prompt = sum(d["result"]["timings"].get("prompt_n", 0) + d["result"]["timings"].get("cache_n", 0) for d in done)
    assert m.value("appliance_instance_prompt_tokens_total", instance="llama-0") - \
        before.value("appliance_instance_prompt_tokens_total", instance="llama-0") == prompt
    assert m.value("appliance_instance_generation_tokens_per_second", instance="llama-0") > 0
    # llama.cpp's own, re-exported with the instance label
    assert m.value("appliance_llamacpp_up", instance="llama-0") == 1
    llama = [f for name, f in m.families.items() if name.startswith("appliance_llamacpp_") and name != "appliance_llamacpp_up"]
    assert len(llama) >= 5, sorted(m.families)
    assert all(s.labels.get("instance") == "llama-0" for f in llama for s in f.samples)
    assert m.value("appliance_llamacpp_tokens_predicted_total", instance="llama-0") >= generated


def test_request_counts_add_up_across_both_api_workers(app):
    """Each request is answered by one of two gunicorn workers; the scrape (answered by one
    of them) must count them all: only the shared directory makes that exact."""
    n = 120
    key = dict(route="/healthz", method="GET", status="200")
    before = scrape(app)

    def hit(_):
        with requests.Session() as s:  # a connection of its own: the kernel picks the worker
            return s.get(app.url + "/healthz", timeout=10).status_code
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(hit, range(n))) == {200}
    after = scrape(app)
    assert after.value("appliance_api_requests_total", **key) - before.value("appliance_api_requests_total", **key) == n
    assert after.value("appliance_api_request_duration_seconds_count", route="/healthz", method="GET") - \
        before.value("appliance_api_request_duration_seconds_count", route="/healthz", method="GET") == n
    assert after.value("appliance_api_requests_in_flight") == 1  # the scrape itself, over both workers

    # and both workers did answer some: each has its own counter file with the route in it
    from prometheus_client.mmap_dict import MmapedDict

    workers = {int(p) for p in subprocess.run(["pgrep", "-P", str(supervised_pid(app, "api"))],
                                              capture_output=True, text=True).stdout.split()}
    assert len(workers) == 2
    served = {}
    for pid in workers:
        path = app.metrics_dir / f"counter_{pid}.db"
        values = MmapedDict.read_all_values_from_file(str(path)) if path.exists() else []
        served[pid] = sum(v for k, v, _, _ in values
                          if json.loads(k)[0] == "appliance_api_requests" and json.loads(k)[2] == key)
    assert all(v > 0 for v in served.values()), served


def test_no_label_carries_a_task_id_or_a_tenant(app):
    done = run_tasks(app, 2)
    ids = {d["task_id"] for d in done}
    app.get(f"/v1/async/status/{'f' * 32}")  # an unknown id in a path: the route template is the label
    app.get("/v1/no-such-route/" + "e" * 32)
    m = scrape(app)
    values = {v for s in m.samples for v in s.labels.values()}
    assert not ids & values
    assert not [v for v in values if TASK_ID.search(v)], values
    assert "tester" not in values  # the tenant and subject of every request here
    assert "/v1/async/status/{task_id}" in values and "unmatched" in values


def test_a_remote_caller_needs_a_token(app, remote_address):
    """OPS_ENDPOINTS=loopback_or_token (the default): from another address, 401 without a token."""
    url = f"http://{remote_address}:{app.port}/metrics"
    r = requests.get(url, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = requests.get(url, headers=app.auth(app.mint("prometheus", "gpu:read")), timeout=10)
    assert r.status_code == 200 and "appliance_broker_up" in r.text
    m = scrape(app)
    assert m.value("appliance_api_auth_refusals_total", reason="unauthenticated") >= 1


def test_a_restarted_broker_leaves_none_of_its_gauges(app):
    run_tasks(app, 1)
    old = supervised_pid(app, "broker")
    assert any(f.name == f"gauge_livesum_{old}.db" for f in app.metrics_dir.iterdir())
    finished = scrape(app).value("appliance_broker_tasks_finished_total")
    assert finished > 0
    out = app.ctl("restart", "broker")
    assert out.returncode == 0, out.stdout + out.stderr
    new = supervised_pid(app, "broker")
    assert new != old
    app.wait_ready()  # /readyz: no scrape has swept anything yet
    assert old not in live_gauge_pids(app.metrics_dir)  # the new broker swept it at its start
    wait_until(lambda: scrape(app).value("appliance_broker_up") == 1 and
               new in live_gauge_pids(app.metrics_dir), 10, 0.2, "the new broker's gauges")
    m = scrape(app)
    assert m.value("appliance_broker_up") == 1  # livesum: not 2
    assert m.value("appliance_broker_health_state") == 1
    assert m.value("appliance_broker_tasks_finished_total") >= finished  # counters are not reset
    done = run_tasks(app, 1)
    assert done[0]["state"] == "completed"


def test_a_restarted_launcher_counts_its_start_and_shows_up_once(app):
    out = app.ctl("restart", "llama:llama-0")
    assert out.returncode == 0, out.stdout + out.stderr
    app.wait_ready()

    def settled():
        m = scrape(app)
        return m.value("appliance_instance_up", instance="llama-0") == 1 and m
    m = wait_until(settled, 30, 0.2, "llama-0 up again")
    assert m.value("appliance_instance_starts_total", instance="llama-0") == 2
    assert m.value("appliance_instance_slots", instance="llama-0") == 2  # one process's, not two
    wait_until(lambda: app.get("/v1/instances").json()["instances"][0]["restarts"] == 1, 10, 0.2,
               "the broker to see the restart")  # what operators see there: starts - 1


def test_a_killed_api_worker_leaves_no_gauges(app):
    master = supervised_pid(app, "api")
    workers = {int(p) for p in subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                                              text=True).stdout.split()}
    scrape(app)
    with_gauges = workers & live_gauge_pids(app.metrics_dir)
    assert with_gauges, (workers, live_gauge_pids(app.metrics_dir))  # each has served requests by now
    victim = min(with_gauges)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in live_gauge_pids(app.metrics_dir), 10, 0.1, "child_exit to mark it dead")
    wait_until(lambda: len(subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                                          text=True).stdout.split()) == 2, 10, 0.1, "a new worker")
    assert scrape(app).value("appliance_api_requests_in_flight") == 1


def test_every_family_is_documented_exactly(app):
    """docs/METRICS.md is what alert rules and dashboards are written from: every
    appliance_* family exposed is in its tables, with the same type and labels."""
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`appliance_"):
            rows[cells[0].strip("`")] = (cells[1], {x.strip() for x in cells[2].split(",") if x.strip()})
    m = scrape(app)
    for name, fam in m.families.items():
        exposed = name + "_total" if fam.type == "counter" else name
        assert exposed in rows, f"{exposed} is not in docs/METRICS.md"
        typ, labels = rows[exposed]
        assert typ == fam.type, (exposed, typ, fam.type)
        seen = {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        assert seen <= labels, (exposed, seen, labels)


# ------------------------------------------------------------------ without an appliance


def test_metrics_follow_the_ops_rule_in_process(tmp_path):
    """The guard decides /metrics like /readyz (tests/test_security.py), for each OPS_ENDPOINTS."""
    from appliance.api.app import create_app
    from appliance.config import load_settings
    from appliance.security import init_env, mint_token

    init_env(tmp_path)
    for mode, far, near in (("loopback_or_token", 401, 200), ("token", 401, 401), ("open", 200, 200)):
        s = load_settings({"APPLIANCE_HOME": str(tmp_path), "BROKER_TIMEOUT_S": "0.2", "OPS_ENDPOINTS": mode})
        client = falcon.testing.TestClient(create_app(s))
        assert client.simulate_get("/metrics", remote_addr="10.1.2.3").status_code == far, mode
        assert client.simulate_get("/metrics", remote_addr="127.0.0.1").status_code == near, mode
        token = mint_token(s, "prometheus", ["gpu:read"], 60)
        r = client.simulate_get("/metrics", remote_addr="10.1.2.3", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "appliance_api_requests_total" in r.text, mode


def test_gpumon_without_a_gpu_says_cpu_only():
    from prometheus_client import REGISTRY

    from appliance import protocol as P
    from appliance.gpu import metrics

    metrics.record(P.Telemetry(time.time(), "none", True, "NVML unavailable", []))
    assert REGISTRY.get_sample_value("appliance_gpu_cpu_only") == 1
    assert REGISTRY.get_sample_value("appliance_gpu_count") == 0
    assert REGISTRY.get_sample_value("appliance_gpumon_source", {"source": "none"}) == 1
    assert REGISTRY.get_sample_value("appliance_gpumon_samples_total", {"outcome": "cpu_only"}) >= 1


def test_unknown_error_codes_and_methods_are_not_new_label_values():
    from prometheus_client import REGISTRY

    from appliance import protocol as P
    from appliance.broker import metrics

    metrics.finished("failed", P.TaskError("Patient Jane Roe said no", "x"))
    metrics.finished("failed", P.TaskError("timeout", "x"))
    assert REGISTRY.get_sample_value("appliance_broker_tasks_finished_total",
                                     {"state": "failed", "error_code": "other"}) >= 1
    assert REGISTRY.get_sample_value("appliance_broker_tasks_finished_total",
                                     {"state": "failed", "error_code": "timeout"}) >= 1
    assert REGISTRY.get_sample_value("appliance_broker_tasks_finished_total",
                                     {"state": "failed", "error_code": "Patient Jane Roe said no"}) is None


def test_sweep_marks_dead_only_processes_that_are_gone(tmp_path):
    from appliance import metrics

    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f"gauge_livesum_{gone.pid}.db", f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db",
                 f"gauge_livesum_{os.getppid()}.db"):
        (tmp_path / name).write_bytes(b"")
    assert metrics.sweep(tmp_path) == [gone.pid]
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == sorted([f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db",
                           f"gauge_livesum_{os.getppid()}.db"])  # counters stay: part of the totals
