"""Submit-and-poll load on the async API (install with `pip install -e '.[load]'`).

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s \
        --host http://127.0.0.1:8000

Each user submits a small chat task, then polls its result until it is final.
"""
import time

from locust import FastHttpUser, between, task

CHAT = {"type": "chat", "messages": [{"role": "user", "content": "Summarise: vitals stable."}], "max_tokens": 16}


class SubmitAndPoll(FastHttpUser):
    wait_time = between(0.0, 0.1)

    @task
    def submit_and_poll(self):
        with self.client.post("/v1/async/submit", json=CHAT, name="submit", catch_response=True) as r:
            if r.status_code != 202:
                r.failure(f"submit answered {r.status_code}")
                return
            task_id = r.json()["task_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.client.get(f"/v1/async/result/{task_id}", name="result", catch_response=True) as r:
                if r.status_code == 200:
                    if r.json()["state"] != "completed":
                        r.failure(f"task ended {r.json()['state']}")
                    return
                if r.status_code != 202:
                    r.failure(f"result answered {r.status_code}")
                    return
            time.sleep(0.05)
