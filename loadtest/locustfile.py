"""Locust users for the API benchmarks (`loadtest/bench_api.py` runs them headless).

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 30s \
        --host http://127.0.0.1:8000 SubmitAndPoll

- SubmitAndPoll: what the system description measured: submit a small chat task,
  poll its status until it is final, fetch the result.
- PacedSubmitAndPoll: the same, each user starting a task every 1/PACE seconds
  (env PACE, tasks/s per user, default 1): latency at a set load, not at saturation.
- SubmitOnly: the submit path alone (its throughput against the ceiling).
- Healthz: the ceiling: the same gunicorn answering /healthz.

Every /v1 call needs a bearer token: set APPLIANCE_TOKEN (`appliance token --sub
loadtest --scopes tasks:read,tasks:write`), and raise RATE_LIMITS on the appliance
under test, or its per-subject buckets are what you measure.
"""
import os
import time

from locust import FastHttpUser, constant, constant_throughput, task

AUTH = {"Authorization": f"Bearer {os.environ.get('APPLIANCE_TOKEN', '')}"}

CHAT = {"type": "chat", "messages": [{"role": "user", "content": "Summarise: vitals stable."}], "max_tokens": 1}
FINAL = {"completed", "failed", "cancelled", "expired"}


def submit(client) -> str | None:
    """Submit the small chat task; its id, or None (counted as a failure)."""
    with client.post("/v1/async/submit", json=CHAT, headers=AUTH, name="submit", catch_response=True) as r:
        if r.status_code != 202:
            r.failure(f"submit answered {r.status_code}")
            return None
        return r.json()["task_id"]


class SubmitAndPoll(FastHttpUser):
    wait_time = constant(0)

    @task
    def submit_and_poll(self):
        task_id = submit(self.client)
        if task_id is None:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.client.get(f"/v1/async/status/{task_id}", headers=AUTH, name="status",
                                 catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status answered {r.status_code}")
                    return
                state = r.json()["state"]
            if state in FINAL:
                with self.client.get(f"/v1/async/result/{task_id}", headers=AUTH, name="result",
                                     catch_response=True) as r:
                    if r.status_code != 200 or r.json()["state"] != "completed":
                        r.failure(f"task ended {state}")
                return
            time.sleep(0.05)


class PacedSubmitAndPoll(SubmitAndPoll):
    wait_time = constant_throughput(float(os.environ.get("PACE", "1")))


class SubmitOnly(FastHttpUser):
    wait_time = constant(0)

    @task
    def submit_only(self):
        submit(self.client)


class Healthz(FastHttpUser):
    wait_time = constant(0)

    @task
    def healthz(self):
        self.client.get("/healthz", name="healthz")
