"""`appliance verify` and `appliance status` against a running appliance, as an operator runs them."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import running_appliance, wait_until


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_appliance(tmp_path_factory) as a:
        # /readyz needs one instance; verify also wants gpumon's first reading at the broker
        ops = a.auth(a.mint("ops", "gpu:read"))
        wait_until(lambda: a.get("/v1/gpu/status", headers=ops).json().get("ts"), 30, 0.1, "telemetry")
        yield a


def appliance(app, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(app.bin / "appliance"), *words], cwd=app.home, env=app.env, capture_output=True,
                          text=True, timeout=120)


def test_verify_passes_on_a_healthy_appliance(app):
    out = appliance(app, "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for name in ("api", "broker", "instances", "gpu monitor", "task", "metrics", "secrets", "journal", "disk"):
        assert any(line.startswith("✓") and f" {name} " in line + " " for line in lines), (name, out.stdout)
    assert "9 of 9 checks passed" in out.stdout


def test_status_shows_programs_queue_and_instances(app):
    out = appliance(app, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broker" in out.stdout and "RUNNING" in out.stdout and "llama-0" in out.stdout
    assert "queue: healthy" in out.stdout and "gpu: none" in out.stdout  # this machine has no GPU
    st = json.loads(appliance(app, "status", "--json").stdout)
    assert {p["name"] for p in st["programs"]} >= {"broker", "api", "gpumon", "llama:llama-0"}
    assert st["broker"]["workers"][0]["name"] == "llama-0" and set(st["broker"]["depth"]) >= {"critical", "batch"}


def test_verify_names_the_failing_check_when_the_broker_is_stopped(app):
    app.ctl("stop", "broker")
    try:
        out = appliance(app, "verify")
        assert out.returncode == 1
        broker = next(line for line in out.stdout.splitlines() if " broker " in line + " ")
        assert broker.startswith("✗") and "broker_unavailable" in broker, out.stdout
        # what needs the broker is not asked again (each would wait BROKER_TIMEOUT_S)
        task = next(line for line in out.stdout.splitlines() if " task " in line + " ")
        assert task.startswith("✗") and "not checked: the broker is not answering" in task, out.stdout
        assert "failed: " in out.stdout and "broker" in out.stdout.splitlines()[-1]
        status = appliance(app, "status")
        assert status.returncode == 1 and "broker not answering" in status.stdout
    finally:
        app.ctl("start", "broker")
        wait_until(lambda: app.get("/readyz").status_code == 200, 60, 0.2, "the broker back")
