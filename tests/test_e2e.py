"""The whole appliance under supervisord: real gunicorn, broker, gpumon, llama.cpp."""
from __future__ import annotations

import time

import pytest

from conftest import wait_until

CHAT = {"type": "chat", "messages": [{"role": "user", "content": "Summarise: patient stable."}], "max_tokens": 24}


def wait_final(app, task_id: str, timeout: float = 30) -> dict:
    def final():
        r = app.get(f"/v1/async/result/{task_id}")
        return r.json() if r.status_code == 200 else None
    return wait_until(final, timeout, 0.05, f"task {task_id} to finish")


def program_states(app) -> dict[str, str]:
    out = app.ctl("status").stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def test_supervisorctl_lists_every_program_running(appliance):
    expected = {"api": "RUNNING", "broker": "RUNNING", "gpumon": "RUNNING", "llama:llama-0": "RUNNING",
                "rag": "RUNNING"}
    # RUNNING comes once a program has stayed up for its startsecs.
    wait_until(lambda: program_states(appliance) == expected, 15, 0.2, "all programs RUNNING")


def test_health_and_readiness(appliance):
    assert appliance.get("/healthz").json() == {"status": "ok"}
    ready = appliance.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["workers_ready"] == 1
    # No GPU here: gpumon must say so rather than stay silent.
    wait_until(lambda: appliance.get("/readyz").json()["gpu"] == "cpu_only", 10, what="gpu state cpu_only")


def test_chat_task_completes_with_text_from_llama_cpp(appliance):
    r = appliance.post("/v1/async/submit", json=CHAT)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    status = appliance.get(f"/v1/async/status/{task_id}").json()
    assert status["task_id"] == task_id and status["state"] in ("queued", "running", "completed")
    body = wait_final(appliance, task_id)
    assert body["state"] == "completed", body
    result = body["result"]
    assert result["text"].strip()
    assert result["completion_tokens"] == 24 and result["finish_reason"] == "length"
    assert result["model"] == "appliance-tiny"
    assert result["timings"]["predicted_n"] == 24 and result["timings"]["predicted_ms"] > 0
    final_status = appliance.get(f"/v1/async/status/{task_id}").json()
    assert final_status["state"] == "completed" and final_status["worker"] == "llama-0"
    assert final_status["created_at"] <= final_status["started_at"] <= final_status["finished_at"]
    assert "result" not in final_status  # status stays small; result carries the text


def test_completion_task(appliance):
    r = appliance.post("/v1/async/submit", json={"type": "complete", "prompt": "The plan is", "max_tokens": 8,
                                                 "priority": "high"})
    assert r.status_code == 202
    body = wait_final(appliance, r.json()["task_id"])
    assert body["state"] == "completed" and body["result"]["completion_tokens"] == 8


def test_many_tasks_all_complete(appliance):
    ids = []
    for i in range(20):
        r = appliance.post("/v1/async/submit", json={**CHAT, "max_tokens": 4,
                                                     "priority": ["low", "normal", "critical"][i % 3]})
        assert r.status_code == 202
        ids.append(r.json()["task_id"])
    assert len(set(ids)) == 20
    for task_id in ids:
        assert wait_final(appliance, task_id)["state"] == "completed"


@pytest.mark.parametrize("body, status, code, field", [
    (b'{"type": "chat",', 400, "malformed_json", None),
    (b"", 400, "malformed_json", None),
    (b"[1, 2]", 422, "invalid_field", ""),
    (b'{"type": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', 422,
     "invalid_field", "max_tokens"),
    (b'{"type": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 422,
     "invalid_field", "max_tokens"),
    (b'{"type": "chat"}', 422, "invalid_field", "messages"),
    (b'{"type": "complete"}', 422, "invalid_field", "prompt"),
    (b'{"type": "dance", "prompt": "x"}', 422, "invalid_field", "type"),
    (b'{"type": "chat", "messages": [{"role": "doctor", "content": "x"}]}', 422, "invalid_field",
     "messages[0].role"),
    (b'{"type": "complete", "prompt": "x", "priority": "urgent"}', 422, "invalid_field", "priority"),
    (b'{"type": "complete", "prompt": "x", "surprise": 1}', 422, "invalid_field", "surprise"),
])
def test_bad_submit_gets_a_json_error_naming_the_field(appliance, body, status, code, field):
    r = appliance.post("/v1/async/submit", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if field:
        assert err["details"]["field"] == field


def test_oversized_body_is_413(appliance):
    r = appliance.post("/v1/async/submit", data=b"x" * 2_000_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("path", ["/v1/async/status/0123456789abcdef0123456789abcdef",
                                  "/v1/async/result/0123456789abcdef0123456789abcdef",
                                  "/v1/async/status/not-an-id", "/v1/async/result/..%2F..%2Fetc",
                                  "/v1/nothing-here"])
def test_unknown_ids_and_routes_are_404(appliance, path):
    r = appliance.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_wrong_method_is_405_json(appliance):
    r = appliance.get("/v1/async/submit")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_bad_input_crashed_nothing(appliance):
    """After every bad request above, every process is still the one that started."""
    assert set(program_states(appliance).values()) == {"RUNNING"}
    log = (appliance.home / "var" / "log" / "supervisord.log").read_text()
    assert "exited" not in log and "(terminated by" not in log, log


def test_broker_down_is_503_within_the_timeout_then_recovers(appliance):
    """A call waits BROKER_TIMEOUT_S (default 5 s: a broker restart costs latency, not
    errors), then 503; the readiness probe says so within its own second."""
    assert appliance.ctl("stop", "broker").returncode == 0
    try:
        t0 = time.monotonic()
        r = appliance.post("/v1/async/submit", json=CHAT)
        took = time.monotonic() - t0
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
        assert 4.9 < took < 6.0, took
        t0 = time.monotonic()
        assert appliance.get("/readyz").status_code == 503
        assert time.monotonic() - t0 < 1.5
        assert appliance.get("/healthz").status_code == 200
    finally:
        assert appliance.ctl("start", "broker").returncode == 0
    appliance.wait_ready(30)
    r = appliance.post("/v1/async/submit", json=CHAT)
    assert r.status_code == 202
    assert wait_final(appliance, r.json()["task_id"])["state"] == "completed"
