"""The operators' load test: locust, headless, against a running appliance; the system
description's table printed and saved.

    make loadtest URL=http://127.0.0.1:8000 TOKEN=$(.venv/bin/appliance token --sub loadtest \
        --scopes tasks:read,tasks:write --ttl 2h) [USERS=20 SECONDS=60 REPORT=loadtest-report.txt]

Each locust user submits a small chat task, polls its status until it is final and
fetches the result (loadtest/locustfile.py, SubmitAndPoll); PACE=1 makes each user
start one task per second instead (PacedSubmitAndPoll: latency at a set load rather
than at saturation). Raise the appliance's RATE_LIMITS for the load test's subject, or
its token buckets are what gets measured.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table(rows: dict[str, dict], users: int, seconds: float, user_class: str) -> str:
    """The system description's summary from locust's stats CSV rows (by request name)."""
    f = float
    sub, st, res = rows["submit"], rows.get("status", {}), rows["result"]
    ok = int(res["Request Count"]) - int(res["Failure Count"])
    failures = int(rows["Aggregated"]["Failure Count"])
    lines = [
        f"load test: {user_class}, {users} users, {seconds:g} s",
        f"  Duration:          {seconds:g} s",
        f"  Tasks submitted:   {sub['Request Count']}",
        f"  Tasks completed:   {ok}  (success rate {100 * ok / max(1, int(res['Request Count'])):.1f} %)",
        f"  Throughput:        {ok / seconds:,.1f} tasks/s ({60 * ok / seconds:,.0f} tasks/min)",
        f"  Submission latency avg {f(sub['Average Response Time']):.1f} ms, p50 {sub['50%']} ms, "
        f"p95 {sub['95%']} ms, p99 {sub['99%']} ms",
    ]
    if st:
        lines.append(f"  Status latency     avg {f(st['Average Response Time']):.1f} ms, p50 {st['50%']} ms, "
                     f"p95 {st['95%']} ms, p99 {st['99%']} ms")
    lines.append(f"  Failed requests:   {failures}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the appliance's API, e.g. http://127.0.0.1:8000")
    ap.add_argument("--token", default=os.environ.get("APPLIANCE_TOKEN", ""), help="bearer token (tasks:read, "
                    "tasks:write); default APPLIANCE_TOKEN")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--pace", type=float, default=0, help="tasks per second per user (0: no pause)")
    ap.add_argument("--report", type=Path, default=Path(time.strftime("loadtest-report-%Y%m%d-%H%M%S.txt")))
    a = ap.parse_args()
    if not a.token:
        sys.exit("loadtest: no token (--token or APPLIANCE_TOKEN)")
    user_class = "PacedSubmitAndPoll" if a.pace > 0 else "SubmitAndPoll"
    out = Path(tempfile.mkdtemp(prefix="loadtest-"))
    locust = Path(sys.executable).parent / "locust"
    print(f"loadtest: {user_class}, {a.users} users for {a.seconds:g} s against {a.url} ...", flush=True)
    run = subprocess.run([str(locust), "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(a.users),
                          "-r", str(a.users), "-t", f"{int(a.seconds)}s", "--host", a.url, "--csv", str(out / "run"),
                          "--only-summary", "--loglevel", "ERROR", user_class],
                         env={**os.environ, "APPLIANCE_TOKEN": a.token, "PACE": str(a.pace or 1)},
                         capture_output=True, text=True, timeout=a.seconds + 300)
    stats = out / "run_stats.csv"
    if not stats.exists():
        sys.exit(f"loadtest: locust wrote no statistics (exit {run.returncode}): {run.stderr[-2000:]}")
    with open(stats) as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    if "submit" not in rows or "result" not in rows:
        sys.exit(f"loadtest: no task went through; locust said: {run.stderr[-2000:]}")
    text = table(rows, a.users, a.seconds, user_class)
    print(text)
    a.report.write_text(text + "\n")
    print(f"loadtest: report saved to {a.report} (locust's CSV files: {out})")
    sys.exit(1 if int(rows["Aggregated"]["Failure Count"]) else 0)


if __name__ == "__main__":
    main()
