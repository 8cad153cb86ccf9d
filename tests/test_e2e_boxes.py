"""Two whole appliances ("boxes") sharing one queue in one PostgreSQL (QUEUE_SCOPE=shared).

Each box is its own home with its own supervisord, broker, llama.cpp launcher, RAG
worker and API, listening on its own loopback address (127.0.0.2 and 127.0.0.3), as
two machines would; they share nothing but the database. One slot per box, so that
"busy" is one long task. The tests run in this order: the last one kills box a.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from conftest import Appliance, appliance_env, make_home, wait_until
from support.postgres import postgres_server  # noqa: F401 (fixture)
from test_e2e_api import sse_events

LONG = {"type": "complete", "prompt": "the patient", "max_tokens": 3000}
SHORT = {"type": "complete", "prompt": "the patient", "max_tokens": 8}
# A task that runs about a second on the test model, every time: the tests' model makes
# ~3,000 tokens/s and its random weights may end a completion at any token, so a
# `complete` with max_tokens 400 was often over (~0.1 s) before a poll of ten statuses saw
# it running (the kill test failed so in CI). The grammar forces 16 strings of 256 chars.
STEADY = {"type": "extract", "messages": [{"role": "user", "content": "the patient"}], "max_tokens": 8000,
          "json_schema": {"type": "array", "minItems": 16, "maxItems": 16,
                          "items": {"type": "string", "minLength": 256, "maxLength": 256}}}


@pytest.fixture(scope="module")
def boxes(tmp_path_factory, postgres_server):
    url = postgres_server.new_database()
    started = []
    try:
        for name, host in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            home = make_home(tmp_path_factory.mktemp(f"box-{name}"))
            app = Appliance(home, appliance_env(home, DATABASE_URL=url, QUEUE_SCOPE="shared", BOX_NAME=name,
                                                API_HOST=host, LEASE_S="4", LLAMA_SLOTS="1"))
            app.start()
            started.append(app)
        for app in started:
            app.wait_ready(120)
        yield started
    except BaseException:
        for app in started:
            print(app.logs())
        raise
    finally:
        for app in started:
            app.stop()


def submit(app: Appliance, body: dict) -> str:
    r = app.post("/v1/async/submit", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def status(app: Appliance, task_id: str) -> dict | None:
    r = app.get(f"/v1/async/status/{task_id}")
    return r.json() if r.status_code == 200 else None


def final(app: Appliance, task_id: str, timeout: float = 60) -> dict:
    def done():
        s = status(app, task_id)
        return s if s is not None and s["state"] in ("completed", "failed", "cancelled", "expired") else None
    return wait_until(done, timeout, 0.1, f"task {task_id} final through {app.url}")


def test_a_busy_box_s_work_runs_on_the_other_and_is_followed_from_the_first(boxes):
    a, b = boxes
    long_id = submit(a, LONG)
    wait_until(lambda: (status(a, long_id) or {}).get("state") == "running", 30, what="the long task running")
    assert status(a, long_id)["box"] == "a"
    short_id = submit(a, SHORT)  # box a's one slot is taken: box b claims it
    with a.get(f"/v1/async/stream/{short_id}", stream=True, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1][0] == "result", events
    rec = json.loads(events[-1][1])
    assert rec["state"] == "completed" and rec["box"] == "b" and rec["attempts"] == 1
    streamed = "".join(json.loads(data)["text"] for kind, data in events if kind == "token")
    assert streamed == a.get(f"/v1/async/result/{short_id}").json()["result"]["text"] and streamed

    r = b.post(f"/v1/async/cancel/{long_id}")  # cancelled through the box that does not run it
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert final(a, long_id)["state"] == "cancelled"
    assert a.get("/v1/async/stats").json()["box"] == "a"
    wait_until(lambda: a.get("/v1/async/stats").json()["boxes"] == ["a", "b"], 10,
               what="box a lists both boxes (as of its last lease renewal)")
    wait_until(lambda: a.get("/v1/async/stats").json()["running"] == 0, 10, what="box a's slot freed")


def test_postgres_restarted_mid_load_refuses_then_recovers_losing_nothing(boxes, postgres_server):
    a, b = boxes
    accepted: list[str] = []
    refused: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            app = boxes[i % 2]
            i += 1
            try:
                r = app.post("/v1/async/submit", json=SHORT)
            except requests.RequestException as exc:
                errors.append(type(exc).__name__)
                continue
            if r.status_code == 202:
                accepted.append(r.json()["task_id"])
            elif r.status_code == 503:
                refused.append(r.json()["error"]["code"])
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")
            time.sleep(0.02)
    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: len(accepted) >= 10, 30, what="load running")
        postgres_server.stop()
        wait_until(lambda: refused, 30, what="a refused submit while PostgreSQL is down")
        time.sleep(1)
        postgres_server.start()
        before = len(accepted)
        wait_until(lambda: len(accepted) >= before + 10, 60, what="submits accepted again")
    finally:
        stop.set()
        thread.join(30)
        if not postgres_server.running:
            postgres_server.start()
    assert not errors, errors[:5]
    assert set(refused) == {"storage_unavailable"}, refused
    states = [final(boxes[i % 2], task_id)["state"] for i, task_id in enumerate(accepted)]
    print("PG", len(accepted), len(refused), states.count("completed"))
    assert states == ["completed"] * len(accepted)


def test_a_box_killed_mid_load_loses_nothing_and_reruns_only_what_it_was_running(boxes):
    a, b = boxes
    ids = [submit(boxes[i % 2], STEADY) for i in range(10)]
    running_on_a = wait_until(lambda: [t for t in ids if (status(a, t) or {}).get("box") == "a"
                                       and status(a, t)["state"] == "running"], 30, 0.02, "a task running on a")
    for _ in range(50):  # the whole box: supervisord, broker, launcher, API (and none restarted meanwhile)
        if not (pids := a.pids()):
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not a.pids()
    records = [final(b, t, timeout=90) for t in ids]  # a's lease (4 s) ends; b runs the rest
    assert [r["state"] for r in records] == ["completed"] * len(ids), records
    # box a had one slot: only the task it was running may run twice, on b, and says so
    again = [r for r in records if r["attempts"] > 1]
    assert len(again) <= 1 and all(r["attempts"] == 2 and r["box"] == "b" for r in again), records
    print("KILL", [(r["box"], r["attempts"]) for r in records], running_on_a)
    assert running_on_a and {r["box"] for r in records} <= {"a", "b"}
