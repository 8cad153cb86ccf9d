"""The five GPU endpoints through the running appliance, on recorded NVML readings.

Two recorded H200s (143,771 MiB each): GPU 0 is almost full with a process that is
not the appliance's (140,000 MiB: past MEMORY_PRESSURE_PCT, so it is throttled), GPU 1
holds 20,480 MiB. llama-0 is configured on
GPU 0 and llama-1 on GPU 1, both offloading every layer (the embedded llama.cpp of
this machine has no GPU device, so both really run on the CPU: the planner and the
readings are what is checked here).
"""
from __future__ import annotations

import json

import pytest

from conftest import running_appliance, wait_until


def gpu(index: int, used: float, pid: int) -> dict:
    return {"name": "NVIDIA H200", "uuid": f"GPU-{index}", "memory_total_mb": 143771.0, "memory_used_mb": used,
            "memory_reserved_mb": 615.125, "memory_free_mb": 143771.0 - 615.125 - used, "utilization_pct": 40,
            "memory_utilization_pct": 10, "temperature_c": 50 + index, "temperature_slowdown_c": 89,
            "temperature_shutdown_c": 92, "power_w": 300.5, "power_limit_w": 700.0, "sm_clock_mhz": 1980,
            "mem_clock_mhz": 3201, "throttle_reasons": [], "processes": [{"pid": pid, "memory_mb": used}]}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    home = tmp_path_factory.mktemp("gpu")
    samples = home / "nvml.jsonl"
    samples.write_text(json.dumps({"t": 0, "gpus": [gpu(0, 140000.0, 4242), gpu(1, 20480.0, 4343)]}) + "\n")
    instances = home / "instances.toml"
    instances.write_text('# two instances, one per GPU\n[[instance]]\nname = "llama-0"\ngpu = 0\ngpu_layers = 999\n'
                         'port = 0\n\n[[instance]]\nname = "llama-1"  # the second\ngpu = 1\ngpu_layers = 999\n'
                         'port = 0\n')
    with running_appliance(tmp_path_factory, INSTANCES_FILE=str(instances), NVML_SAMPLES=str(samples)) as a:
        wait_until(lambda: len(a.get("/v1/async/stats").json()["workers"]) == 2, 60, 0.2, "both instances")
        a.reader = a.mint("ops", "gpu:read")
        # the broker hears gpumon's first reading up to a publish period after both
        # instances are up (a SUB socket joins late): until then the status says "none"
        wait_until(lambda: a.get("/v1/gpu/status", headers=a.auth(a.reader)).json()["source"] == "samples",
                   20, 0.2, "the first NVML reading at the broker")
        a.admin = a.mint("root", "admin", "gpu:read")
        a.instances_file = instances
        yield a


def test_status_shows_the_readings_throttle_states_and_instances_per_gpu(app):
    r = app.get("/v1/gpu/status", headers=app.auth(app.reader))
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["source"] == "samples" and not st["cpu_only"] and st["limits"]["thermal_limit_c"] == 85
    g0, g1 = st["gpus"]
    assert (g0["index"], g0["memory_used_mb"], g0["memory_reserved_mb"], g0["power_w"], g0["power_limit_w"]) == \
        (0, 140000.0, 615.125, 300.5, 700.0)
    # GPU 0 is 97 % full (MEMORY_PRESSURE_PCT 95): no new work for its instance, and why
    assert g0["throttled"] is True and g0["throttle_reason"] == "memory 97 % used, limit 95"
    assert g1["throttled"] is False and g1["throttle_reason"] == ""
    assert [i["name"] for i in g0["instances"]] == ["llama-0"] and [i["name"] for i in g1["instances"]] == ["llama-1"]
    inst = g0["instances"][0]
    assert inst["registered"] and inst["layers_offloaded"] == 0 and "no GPU device" in inst["layers_source"]
    assert inst["layers_total"] >= 2
    assert app.get("/v1/gpu/status").status_code == 403  # tasks:read/write only: no gpu:read


def test_memory_forecast_from_the_gguf_and_its_fit_on_each_gpu(app):
    h = app.auth(app.reader)
    r = app.get("/v1/gpu/memory-forecast?model=appliance-tiny&n_ctx=2048&n_parallel=2", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    fc = body["forecast"]
    assert body["model"] == "appliance-tiny" and fc["n_ctx"] == 2048 and fc["n_parallel"] == 2
    assert fc["gpu_layers"] == body["n_layer"] + 1 and fc["cuda_context_mb"] == 650
    assert abs(fc["total_mb"] - (fc["weights_mb"] + fc["kv_mb"] + fc["compute_mb"] + fc["output_mb"]
                                 + fc["cuda_context_mb"])) < 0.01
    double = app.get("/v1/gpu/memory-forecast?model=appliance-tiny&n_ctx=4096&n_parallel=2", headers=h).json()
    assert abs(double["forecast"]["kv_mb"] - 2 * fc["kv_mb"]) < 1e-6
    fits = {f["gpu"]: f for f in body["fits"]}
    assert fits[0]["fits"] is False and "only" in fits[0]["reason"] and fits[1]["fits"] is True
    for query, status, code in (("model=nope", 404, "model_not_found"), ("n_ctx=0", 422, "invalid_field"),
                                ("n_ctx=abc", 422, "invalid_field"), ("kv_type=q9", 422, "invalid_field"),
                                ("n_ctx=1&n_parallel=2", 422, "impossible_configuration")):
        bad = app.get(f"/v1/gpu/memory-forecast?{query}", headers=h)
        assert (bad.status_code, bad.json()["error"]["code"]) == (status, code), (query, bad.text)


def test_models_optimal_for_the_gpus_seen_and_for_a_given_size(app):
    h = app.auth(app.reader)
    body = app.get("/v1/gpu/models-optimal", headers=h).json()
    by_gpu = {m["gpu"]: m for m in body["models"]}
    assert by_gpu[0]["fits"] is False and by_gpu[0]["reason"]
    assert by_gpu[1]["fits"] is True and by_gpu[1]["n_ctx"] >= 256 and by_gpu[1]["n_parallel"] >= 1
    small = app.get("/v1/gpu/models-optimal?gpu_memory_mb=300", headers=h).json()["models"][0]
    assert small["fits"] is False and "CUDA context" in small["reason"]
    assert app.get("/v1/gpu/models-optimal?gpu_memory_mb=-5", headers=h).status_code == 422


def test_rebalance_plans_then_applies_through_supervisord(app):
    plan = app.post("/v1/gpu/rebalance", json={}, headers=app.auth(app.reader))
    assert plan.status_code == 200, plan.text
    moves = {p["name"]: p for p in plan.json()["plan"]}
    assert moves["llama-0"]["moves"] and moves["llama-0"]["gpu"] == 1 and not moves["llama-1"]["moves"]
    assert plan.json()["restart"] == ["llama-0"] and plan.json()["applied"] is None
    denied = app.post("/v1/gpu/rebalance", json={"apply": True}, headers=app.auth(app.reader))
    assert denied.status_code == 403 and denied.json()["error"]["details"]["required"] == "admin"
    assert app.post("/v1/gpu/rebalance", json={"apply": "yes"}, headers=app.auth(app.reader)).status_code == 422
    done = app.post("/v1/gpu/rebalance", json={"apply": True}, headers=app.auth(app.admin))
    assert done.status_code == 200, done.text
    text = app.instances_file.read_text()
    assert "# two instances, one per GPU" in text and '# the second' in text  # the operator's comments stay
    assert (app.instances_file.parent / "instances.toml.bak").exists()
    wait_until(lambda: {i["name"]: i["gpu"] for i in app.get("/v1/instances").json()["instances"]}.get("llama-0") == 1,
               30, 0.2, "llama-0 on GPU 1")
    wait_until(lambda: len(app.get("/v1/async/stats").json()["workers"]) == 2, 60, 0.2, "llama-0 back")
    again = app.post("/v1/gpu/rebalance", json={}, headers=app.auth(app.reader)).json()
    assert again["restart"] == []  # both fit where they are now


def test_benchmark_runs_at_batch_priority_on_the_named_instance(app):
    r = app.post("/v1/gpu/benchmark-model", json={"instance": "llama-1", "max_tokens": 16},
                 headers=app.auth(app.admin))
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["instance"] == "llama-1" and b["prompt_tokens"] > 50 and b["generated_tokens"] >= 1
    assert b["prompt_tokens_per_s"] > 0 and b["generation_tokens_per_s"] > 0
    st = app.get(f"/v1/async/status/{b['task_id']}", headers=app.auth(app.admin)).json()
    assert (st["priority"], st["worker"], st["pin"]) == ("batch", "llama-1", "llama-1")
    assert app.post("/v1/gpu/benchmark-model", json={"instance": "llama-9"},
                    headers=app.auth(app.admin)).status_code == 404
    assert app.post("/v1/gpu/benchmark-model", json={"instance": "llama-1"},
                    headers=app.auth(app.reader)).status_code == 403
