"""Several models and instances through the whole appliance: real supervisord, real
llama.cpp servers, real routing.

Three instances from an instances file: two of a slower generated model ("slow", on
recorded GPUs 0 and 1, two slots each with one reserved for critical work) and one of
the tiny model. The GPU readings come from a recorded-sample file the test rewrites to
heat GPU 1 up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import openai
import pytest

from conftest import BIN, make_home, running_appliance, wait_until

INSTANCES = """
[[instance]]
name = "llama-0"
model = "{slow}"
alias = "slow"
slots = 2
reserved_slots = 1
ctx = 8192
gpu = 0

[[instance]]
name = "llama-1"
model = "{slow}"
alias = "slow"
slots = 2
reserved_slots = 1
ctx = 8192
gpu = 1

[[instance]]
name = "tiny-b"
slots = 1
"""

ADDED = """
[[instance]]
name = "llama-2"
model = "{slow}"
alias = "slow"
slots = 1
"""

LONG = {"type": "complete", "model": "slow", "prompt": "the patient", "max_tokens": 4000}


def samples(path, hot: bool) -> None:
    def gpu(name, temp):
        return {"name": name, "memory_total_mb": 24576,
                "samples": [{"memory_used_mb": 4000, "temperature_c": temp, "utilization_pct": 50}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": [gpu("GPU 0", 60), gpu("GPU 1", 91 if hot else 60)]}))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from appliance.llama.tinymodel import TinySpec, write_tiny_model

    slow = write_tiny_model(tmp_path_factory.mktemp("slow") / "slow.gguf",
                            TinySpec(n_embd=256, n_layer=4, n_ff=1024, n_ctx=8192))
    nvml = tmp_path_factory.mktemp("nvml") / "samples.json"
    samples(nvml, hot=False)
    instances = tmp_path_factory.mktemp("conf") / "instances.toml"
    instances.write_text(INSTANCES.format(slow=slow))
    with running_appliance(tmp_path_factory, INSTANCES_FILE=str(instances), NVML_SAMPLES=str(nvml),
                           CRITICAL_MAX_WAIT_MS="0") as a:
        a.slow, a.nvml, a.instances = slow, nvml, instances
        wait_until(lambda: len(a.get("/v1/async/stats").json()["workers"]) == 3, 60, what="three instances")
        wait_until(lambda: a.ctl("status").stdout.count("RUNNING") == 7, 30, what="every program RUNNING")
        yield a


def submit(app, **body):
    r = app.post("/v1/async/submit", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def final(app, task_id, timeout=60):
    def done():
        r = app.get(f"/v1/async/result/{task_id}")
        return r.json() if r.status_code == 200 else None
    try:
        return wait_until(done, timeout, 0.05, f"task {task_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status {status(app, task_id)}; stats {app.get('/v1/async/stats').json()}")


def status(app, task_id):
    return app.get(f"/v1/async/status/{task_id}").json()


def settle(app):
    """Wait until nothing runs or waits (the previous test's long tasks are cancelled)."""
    wait_until(lambda: (s := app.get("/v1/async/stats").json())["running"] == 0 and s["queued"] == 0, 60,
               what="an idle appliance")


def cancel_all(app, ids):
    for t in ids:
        app.post(f"/v1/async/cancel/{t}")
    settle(app)


def test_models_and_instances_are_listed(app):
    models = {m["id"]: m["state"] for m in app.get("/v1/models").json()["data"]}
    assert models == {"slow": "ready", "appliance-tiny": "ready"}
    listed = {i["name"]: i for i in app.get("/v1/instances").json()["instances"]}
    assert set(listed) == {"llama-0", "llama-1", "tiny-b"}
    assert all(i["state"] == "RUNNING" and i["registered"] and i["endpoint"] for i in listed.values())
    assert [listed[n]["gpu"] for n in ("llama-0", "llama-1", "tiny-b")] == [0, 1, None]
    assert listed["llama-0"]["slots"] == {"busy": 0, "total": 2, "reserved": 1}
    status_out = app.ctl("status").stdout
    for name in listed:
        assert f"llama:{name}" in status_out  # operators see the group, as before


def test_tasks_reach_only_their_own_models_instances(app):
    slow = [submit(app, type="complete", model="slow", prompt="x", max_tokens=4) for _ in range(6)]
    tiny = [submit(app, type="complete", model="appliance-tiny", prompt="x", max_tokens=4) for _ in range(3)]
    default = submit(app, type="complete", prompt="x", max_tokens=4)  # the first configured model
    slow_workers = {final(app, t)["result"]["provenance"]["instance"] for t in slow}
    tiny_results = [final(app, t)["result"] for t in tiny]
    assert slow_workers <= {"llama-0", "llama-1"}
    assert {r["provenance"]["instance"] for r in tiny_results} == {"tiny-b"}
    assert status(app, default)["model"] == "slow"
    slow_prov = final(app, slow[0])["result"]["provenance"]
    assert slow_prov["gguf_sha256"] != tiny_results[0]["provenance"]["gguf_sha256"]
    assert slow_prov["model"] == "slow" and slow_prov["quantization"] == "F32"
    assert slow_prov["sampling"]["seed"] >= 0 and slow_prov["sampling"]["max_tokens"] == 4


def test_an_unknown_model_is_404_at_once(app):
    r = app.post("/v1/async/submit", json={"type": "complete", "model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=app.token, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    r = client.chat.completions.create(model="appliance-tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2)
    assert r.choices[0].message.content is not None


def test_a_conversation_sticks_to_its_instance_and_reuses_its_cache(app):
    settle(app)
    history = [{"role": "system", "content": "You are a clinical assistant. " * 20},
               {"role": "user", "content": "58 year old, chest pain since this morning."}]
    first = final(app, submit(app, type="chat", model="slow", messages=history, max_tokens=8))
    home = first["result"]["provenance"]["instance"]
    for turn in ("Radiating to the left arm.", "Sweating too."):
        history += [{"role": "assistant", "content": "Go on."}, {"role": "user", "content": turn}]
        res = final(app, submit(app, type="chat", model="slow", messages=history, max_tokens=8))["result"]
        assert res["provenance"]["instance"] == home
        assert res["cached_tokens"] >= 100  # the long system prompt came from llama.cpp's cache
    # a long request of the same conversation takes home's one normal slot (its other
    # slot is reserved for critical work): load no longer allows, and the next turn moves
    blocker = submit(app, type="chat", model="slow", messages=history[:2], max_tokens=4000)
    wait_until(lambda: status(app, blocker)["state"] == "running", 10, what="the blocker running")
    assert status(app, blocker)["worker"] == home
    history += [{"role": "assistant", "content": "Go on."}, {"role": "user", "content": "Now dizzy."}]
    moved = final(app, submit(app, type="chat", model="slow", messages=history, max_tokens=8))["result"]
    assert moved["provenance"]["instance"] != home
    cancel_all(app, [blocker])


def test_a_critical_task_takes_the_reserved_slot_while_batch_work_fills_the_rest(app):
    settle(app)
    batch = [submit(app, **LONG, priority="batch") for _ in range(5)]
    wait_until(lambda: sum(status(app, t)["state"] == "running" for t in batch) == 2, 10, what="2 batch running")
    time.sleep(0.5)
    assert sum(status(app, t)["state"] == "running" for t in batch) == 2  # one normal slot each, no more
    t0 = time.time()
    crit = submit(app, type="complete", model="slow", prompt="x", max_tokens=4, priority="critical")
    rec = final(app, crit, timeout=10)
    started = status(app, crit)["started_at"]
    assert rec["state"] == "completed" and started - t0 < 5  # a bound against a hang, not a timing
    # Both batch tasks still run: the critical one took the reserved slot, it did not wait for one of them.
    assert sum(status(app, t)["state"] == "running" for t in batch) == 2
    cancel_all(app, batch)


def test_a_throttled_gpu_gets_no_new_work(app):
    settle(app)
    samples(app.nvml, hot=True)

    def throttled():
        return {w["name"]: w["throttled"] for w in app.get("/v1/async/stats").json()["workers"]}
    wait_until(lambda: throttled().get("llama-1"), 10, what="GPU 1 throttled")
    ids = [submit(app, type="complete", model="slow", prompt="x", max_tokens=4) for _ in range(6)]
    assert {final(app, t)["result"]["provenance"]["instance"] for t in ids} == {"llama-0"}
    assert app.get("/v1/instances").json()["instances"][1]["throttled"] is True
    samples(app.nvml, hot=False)
    wait_until(lambda: not throttled().get("llama-1"), 10, what="GPU 1 cool again")


def test_a_killed_instance_s_task_is_retried_on_another(app):
    settle(app)
    task_id = submit(app, **LONG)
    wait_until(lambda: status(app, task_id)["state"] == "running", 10, what="running")
    victim = status(app, task_id)["worker"]
    pid = int(app.ctl("pid", f"llama:{victim}").stdout.strip())
    os.kill(pid, signal.SIGKILL)
    rec = final(app, task_id, timeout=90)
    st = status(app, task_id)
    assert rec["state"] == "completed" and st["attempts"] == 2 and st["worker"] != victim
    wait_until(lambda: f"llama:{victim}" in app.ctl("status").stdout and
               "RUNNING" in app.ctl("status", f"llama:{victim}").stdout, 15, what="supervisord restarted it")


def test_reload_adds_an_instance_without_restarting_the_others(app):
    before = {n: app.ctl("pid", f"llama:{n}").stdout.strip() for n in ("llama-0", "llama-1", "tiny-b")}
    app.instances.write_text(INSTANCES.format(slow=app.slow) + ADDED.format(slow=app.slow))
    out = subprocess.run([str(BIN / "appliance"), "reload"], cwd=app.home, env=app.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "added: llama-2" in out.stdout and "unchanged: llama-0, llama-1, tiny-b" in out.stdout
    wait_until(lambda: len(app.get("/v1/async/stats").json()["workers"]) == 4, 60, what="the new instance")
    after = {n: app.ctl("pid", f"llama:{n}").stdout.strip() for n in before}
    assert after == before
    assert "llama:llama-2" in app.ctl("status").stdout


def test_restart_an_instance_through_the_api(app):
    admin = app.mint("ops", "admin")
    user = app.mint("user", "tasks:read", "tasks:write")
    assert app.post("/v1/instances/tiny-b/restart", headers=app.auth(user)).status_code == 403
    r = app.post("/v1/instances/nope/restart", headers=app.auth(admin))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    pid = app.ctl("pid", "llama:tiny-b").stdout.strip()
    r = app.post("/v1/instances/tiny-b/restart", headers=app.auth(admin))
    assert r.status_code == 200 and r.json()["state"] == "RUNNING"
    assert app.ctl("pid", "llama:tiny-b").stdout.strip() != pid

    def restarts():
        listed = {i["name"]: i for i in app.get("/v1/instances").json()["instances"]}
        return listed["tiny-b"]["registered"] and listed["tiny-b"]["restarts"] == 1
    wait_until(restarts, 30, what="tiny-b registered again, one restart counted")


def test_a_malformed_instances_file_stops_start_up_naming_the_key(tmp_path):
    home = make_home(tmp_path)
    (home / "instances.toml").write_text('[[instance]]\nname = "llama-0"\nslots = "many"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "LLAMA_", "INSTANCES_"))}
    env["APPLIANCE_HOME"] = str(home)
    out = subprocess.run([str(BIN / "appliance"), "up"], cwd=home, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "instance[0].slots" in out.stderr, out.stderr
    assert not (home / "var" / "run" / "supervisord.pid").exists()
