"""End-to-end latency of small tasks, one at a time, against a running appliance.

    .venv/bin/python loadtest/latency.py --n 200 --url http://127.0.0.1:8000

Prints a table: submit round trip, time until the result is visible (polling every
millisecond), and the broker's own created->finished time, as avg/p50/p95/p99 in ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import requests


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--token", default=os.environ.get("APPLIANCE_TOKEN", ""),
                    help="bearer token (default: $APPLIANCE_TOKEN); mint one with `appliance token`")
    args = ap.parse_args()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {args.token}"
    body = {"type": "chat", "messages": [{"role": "user", "content": "Summarise: vitals stable."}],
            "max_tokens": args.max_tokens}
    submit, visible, broker = [], [], []
    for _ in range(args.n):
        t0 = time.perf_counter()
        r = s.post(args.url + "/v1/async/submit", json=body)
        r.raise_for_status()
        t1 = time.perf_counter()
        task_id = r.json()["task_id"]
        while True:
            r = s.get(f"{args.url}/v1/async/result/{task_id}")
            if r.status_code == 200:
                break
            time.sleep(0.001)
        t2 = time.perf_counter()
        st = s.get(f"{args.url}/v1/async/status/{task_id}").json()
        assert st["state"] == "completed", st
        submit.append((t1 - t0) * 1000)
        visible.append((t2 - t0) * 1000)
        broker.append((st["finished_at"] - st["created_at"]) * 1000)
    print(f"{args.n} sequential chat tasks, max_tokens={args.max_tokens}")
    print(f"{'ms':<28}{'avg':>8}{'p50':>8}{'p95':>8}{'p99':>8}")
    for name, v in [("submit round trip", submit), ("submit -> result visible", visible),
                    ("broker created -> finished", broker)]:
        print(f"{name:<28}{statistics.mean(v):>8.2f}{pct(v, 50):>8.2f}{pct(v, 95):>8.2f}{pct(v, 99):>8.2f}")


if __name__ == "__main__":
    main()
