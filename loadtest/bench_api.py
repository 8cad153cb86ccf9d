"""API benchmarks against a real appliance it starts itself (tiny model, temp home).

    .venv/bin/python loadtest/bench_api.py [--users 50 --seconds 30]

1. locust, headless, FastHttpUser: the ceiling (/healthz on the same gunicorn), the
   submit path alone, and submit + poll status + result — printed as the system
   description's table (duration, tasks, success, throughput, latencies, queue depth)
   — at saturation (no pause between tasks) and at a set pace (one task per user
   per second), since latency at saturation is only users / throughput.
2. The paced test again with one thread per user instead of locust.
3. Added latency: the same small chat request sequentially through
   /v1/chat/completions and straight to the llama.cpp server, p50/p99 of each and
   of the difference.

Settings (README's table: the upper-cased fields of appliance.config.Settings) set in
the caller's environment reach the appliance, e.g. `API_WORKERS=4 .venv/bin/python
loadtest/bench_api.py`; QUEUE_MAX_SIZE and RATE_LIMITS default to the benchmark's
(lifted) values when not set. The paths, sockets and ports are the benchmark's own
(a temp home, free ports), and its tokens are HS256: an override of the caller's value
is printed. The report starts with the settings in force.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from appliance.config import SECRET_KEYS, Settings, load_settings
from appliance.llama.server import free_port
from appliance.security import init_env, mint_token

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# the small task both non-locust clients submit (the locust users send the same one)
SUBMIT_BODY = json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Summarise: vitals stable."}],
                          "max_tokens": 1}).encode()

SETTINGS = [name.upper() for name in Settings.__struct_fields__]
# The benchmark's appliance lives in a temp home on free ports, so that it cannot touch
# (or collide with) an appliance already running: these come from the home, whatever
# the caller's environment says.
OWN = ("APPLIANCE_HOME", "DATA_DIR", "RUN_DIR", "LOG_DIR", "DATABASE_URL", "AUDIT_LOG", "BROKER_FRONT",
       "BROKER_BACK", "BROKER_EVENTS", "TELEMETRY_ENDPOINT", "API_PORT", "LLAMA_PORT_BASE")
# Always in the report, with whatever the caller set and the benchmark overrode.
SHOWN = ("API_WORKERS", "API_CONNECTIONS", "LLAMA_SLOTS", "LLAMA_THREADS", "QUEUE_MAX_SIZE", "RATE_LIMITS")
# Non-setting variables with these prefixes are left out (LLAMA_ARG_* is read by llama-server itself).
STRAY = ("API_", "LLAMA_", "MODEL_", "BROKER_", "JWT_", "AUDIT_", "RATE_")


def cores() -> str:
    n = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
    return f"{n} cores" + (f" ({usable} usable by this process)" if usable != n else "")


def appliance_environment(home: Path, port: int,
                          defaults: dict[str, str]) -> tuple[dict[str, str], set[str], list[str]]:
    """The environment for the benchmark's appliance, the caller's settings it keeps, and
    notes on the caller's settings it overrides.

    The caller's settings pass; `defaults` (the benchmark's own choices) fill in where
    the caller set nothing; the home's paths and ports, and HS256 (the benchmark mints
    its tokens with the home's secret), override the caller's, with a note each."""
    caller = {k: v for k, v in os.environ.items() if k in SETTINGS}
    e = {k: v for k, v in os.environ.items() if k in SETTINGS or not k.startswith(STRAY)}
    notes = []
    own = {"APPLIANCE_HOME": str(home), "API_PORT": str(port)}
    for key in OWN:
        if key in caller:
            notes.append(f"{key}: the caller's {caller.pop(key)!r} is not used (the benchmark's appliance uses "
                         f"its temp home and free ports)")
        e.pop(key, None)
    if caller.get("JWT_ALGORITHM", "HS256") != "HS256":
        notes.append(f"JWT_ALGORITHM: the caller's {caller['JWT_ALGORITHM']!r} is replaced by HS256 "
                     "(the benchmark mints its own tokens; it has no private key)")
        e["JWT_ALGORITHM"] = "HS256"
        e.pop("JWT_PUBLIC_KEY_FILE", None)
        caller.pop("JWT_ALGORITHM")
    e.update(own)
    e["LOG_LEVEL"] = "WARNING"
    for key, value in defaults.items():
        e.setdefault(key, str(value))
    if "RATE_LIMITS" in caller:
        notes.append("RATE_LIMITS is the caller's: its buckets are per subject, and here one subject "
                     "is the whole load (the benchmark lifts them when RATE_LIMITS is not set)")
    return e, set(caller), notes


def settings_report(s: Settings, caller: set[str], defaults: dict[str, str], notes: list[str]) -> str:
    """The settings in force, as the appliance reads them (environment > home's .env > defaults)."""
    lines = ["settings in force (from the environment, else the benchmark's choice, else the default):"]
    for key in [k for k in SETTINGS if k in SHOWN or k in caller]:
        if key in SECRET_KEYS:
            value = "(set, not shown)"
        else:
            value = getattr(s, key.lower())
            value = str(value).lower() if isinstance(value, bool) else str(value)
        source = "environment" if key in caller else "benchmark" if key in defaults else "default"
        lines.append(f"  {key:18}{value:<20} ({source})")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


class Appliance:
    def __init__(self, **env):
        self.home = Path(tempfile.mkdtemp(prefix="bench-api-"))
        shutil.copy(ROOT / "supervisord.conf", self.home)
        init_env(self.home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        defaults = {k: str(v) for k, v in env.items()}
        e, caller, notes = appliance_environment(self.home, self.port, defaults)
        try:
            settings = load_settings(e)  # a caller's value that is wrong stops the run here, named
        except SystemExit:
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        print(settings_report(settings, caller, defaults, notes), flush=True)
        self.settings = settings
        self.token = mint_token(settings, "loadtest", ["tasks:read", "tasks:write"], 3600)
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.json_auth = {**self.auth, "Content-Type": "application/json"}
        up_log = self.home / "up.log"
        with up_log.open("wb") as out:
            self.proc = subprocess.Popen([str(BIN / "appliance"), "up"], cwd=self.home, env=e,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "was not ready after 90 s"
        logs = [up_log, *sorted((self.home / "var" / "log").glob("*.log"))]
        tail = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in logs if f.is_file())
        self.stop()
        raise RuntimeError(f"the appliance {why}:\n{tail}")

    def stop(self):
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.home / "supervisord.conf"), "shutdown"],
                       capture_output=True, timeout=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


def cpu_by_program(session: int) -> dict[str, float]:
    """CPU seconds used so far by the appliance's processes (supervisord's session), by program."""
    tick = os.sysconf("SC_CLK_TCK")
    use: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if int(stat[3]) != session:
            continue
        name = next((p for p in ("api", "broker", "llama", "gpumon") if f"procs.{p}" in cmd), "supervisord")
        use[name] = use.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return use


def locust(app: Appliance, user: str, users: int, seconds: int, out: Path, **env: str) -> dict[str, dict]:
    """Run one locust phase; rows by request name, plus "_cpu": CPU microseconds per request."""
    prefix = out / user
    url = app.url
    before, t0 = cpu_by_program(app.proc.pid), os.times()
    subprocess.run([str(BIN / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
                    "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(prefix),
                    "--only-summary", "--loglevel", "ERROR", user],
                   check=False, capture_output=True, timeout=seconds + 120,
                   env={**os.environ, "APPLIANCE_TOKEN": app.token, **env})
    after, t1 = cpu_by_program(app.proc.pid), os.times()
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    n = max(1, int(rows["Aggregated"]["Request Count"]))
    cpu = {k: 1e6 * (after[k] - before.get(k, 0.0)) / n for k in after}
    cpu["locust"] = 1e6 * (t1.children_user + t1.children_system - t0.children_user - t0.children_system) / n
    rows["_cpu"] = cpu
    return rows


def watch_depth(app: Appliance, stop: threading.Event, samples: list[int]) -> None:
    url = app.url
    s = requests.Session()
    s.headers.update(app.auth)
    while not stop.is_set():
        try:
            samples.append(s.get(url + "/v1/async/stats", timeout=2).json()["queued"])
        except requests.RequestException:
            pass
        stop.wait(0.5)


class Probe(threading.Thread):
    """Submits one task every 100 ms on its own connection while locust loads the box.

    Latency as an unloaded client sees it, apart from the load generator: locust's
    own timings include its 50 users' scheduling inside one process (on this 2-core
    box a probe beside it saw p50 4.6 ms while locust reported 46 ms, same seconds).
    """

    def __init__(self, app: Appliance):
        super().__init__(daemon=True)
        self.app, self.stop, self.ms = app, threading.Event(), []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.app.port, timeout=10)
        while not self.stop.wait(0.1):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/async/submit", body=SUBMIT_BODY, headers=self.app.json_auth)
            r = conn.getresponse()
            r.read()
            if r.status == 202:
                self.ms.append((time.perf_counter() - t0) * 1000)

    def during(self, phase):
        self.start()
        try:
            return phase()
        finally:
            self.stop.set()
            self.join()

    def summary(self) -> str:
        v = sorted(self.ms)
        if not v:
            return "no samples"
        return (f"p50 {_pct(v, 50):.1f} ms, p95 {_pct(v, 95):.1f} ms, p99 {_pct(v, 99):.1f} ms "
                f"({len(v)} submits)")


def _pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def bench_locust(app: Appliance, users: int, seconds: int) -> None:
    out = Path(tempfile.mkdtemp(prefix="locust-"))
    ceiling_rows = locust(app, "Healthz", users, seconds, out)
    ceiling = ceiling_rows["healthz"]
    depth: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=watch_depth, args=(app, stop, depth))
    t.start()
    probe_full = Probe(app)
    full = probe_full.during(lambda: locust(app, "SubmitAndPoll", users, seconds, out))
    stop.set()
    t.join()
    probe_paced = Probe(app)
    paced = probe_paced.during(lambda: locust(app, "PacedSubmitAndPoll", users, seconds, out, PACE="1"))
    # last: it leaves a backlog that the model drains long after the phase ends
    submit_rows = locust(app, "SubmitOnly", users, seconds, out)
    submit_only = submit_rows["submit"]
    sub, st, res = full["submit"], full["status"], full["result"]
    n_sub = int(sub["Request Count"])
    ok = int(res["Request Count"]) - int(res["Failure Count"])
    f = float
    print(f"\n1. locust, {users} users, {seconds} s per phase, load generator on the same machine")
    print(f"{'':34}{'requests/s':>12}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'failures':>10}")
    for name, row in (("ceiling: GET /healthz", ceiling), ("POST submit alone", submit_only)):
        print(f"{name:34}{f(row['Requests/s']):>12,.0f}{row['50%']:>8}{row['95%']:>8}{row['99%']:>8}"
              f"{row['Failure Count']:>10}")
    print(f"submit throughput / ceiling: {f(submit_only['Requests/s']) / f(ceiling['Requests/s']):.0%}")
    print(f"CPU per request, microseconds (all phases share the same {cores()}):")
    progs = ("api", "broker", "llama", "supervisord", "locust")
    print(f"{'':34}" + "".join(f"{p:>12}" for p in progs) + f"{'total':>10}")
    for name, rows in (("ceiling: GET /healthz", ceiling_rows), ("POST submit alone", submit_rows)):
        c = rows["_cpu"]
        print(f"{name:34}" + "".join(f"{c.get(p, 0):>12,.0f}" for p in progs) + f"{sum(c.values()):>10,.0f}")
    print(f"\nsubmit + poll status + result (the system description's test), {users} users:")
    print(f"  Duration:          {seconds} s")
    print(f"  Tasks submitted:   {n_sub}")
    print(f"  Tasks completed:   {ok}  (success rate {100 * ok / max(1, int(res['Request Count'])):.1f} %)")
    print(f"  Throughput:        {ok / seconds:,.1f} tasks/s ({60 * ok / seconds:,.0f} tasks/min)")
    print(f"  Submission latency avg {f(sub['Average Response Time']):.1f} ms, p50 {sub['50%']} ms, "
          f"p95 {sub['95%']} ms, p99 {sub['99%']} ms")
    print(f"  Status latency     avg {f(st['Average Response Time']):.1f} ms, p50 {st['50%']} ms, "
          f"p95 {st['95%']} ms, p99 {st['99%']} ms")
    if depth:
        print(f"  Queue depth        peak {max(depth)}, average {statistics.mean(depth):.1f}, min {min(depth)}")
    print(f"  Probe (a separate client, one submit per 100 ms): {probe_full.summary()}")
    sub, st = paced["submit"], paced["status"]
    print(f"\nthe same at a set pace: {users} users, each starting a task every second (offered {users} tasks/s):")
    print(f"  Tasks completed:   {int(paced['result']['Request Count']) - int(paced['result']['Failure Count'])}"
          f"  ({f(paced['result']['Requests/s']):.1f} tasks/s), failures {paced['Aggregated']['Failure Count']}")
    print(f"  Submission latency avg {f(sub['Average Response Time']):.1f} ms, p50 {sub['50%']} ms, "
          f"p95 {sub['95%']} ms, p99 {sub['99%']} ms")
    print(f"  Status latency     avg {f(st['Average Response Time']):.1f} ms, p50 {st['50%']} ms, "
          f"p95 {st['95%']} ms, p99 {st['99%']} ms")
    print(f"  Probe (a separate client, one submit per 100 ms): {probe_paced.summary()}")
    shutil.rmtree(out, ignore_errors=True)


def wait_idle(app: Appliance) -> dict:
    """Block until nothing is queued or running (the locust phases leave a backlog
    that llama.cpp drains for a while); the broker's stats then."""
    deadline = time.monotonic() + 300
    while True:
        st = requests.get(app.url + "/v1/async/stats", headers=app.auth, timeout=10).json()
        if st["queued"] == 0 and st["running"] == 0:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError("the queue did not drain")
        time.sleep(1)


def bench_paced_clients(app: Appliance, users: int, seconds: int, rates=(10, 50)) -> None:
    """The paced test without locust: one thread and connection per user, arrivals
    spread evenly (user i starts at i/users of each period), submit then poll status
    every 50 ms until the task completes."""
    wait_idle(app)
    print(f"\n2. paced clients without locust: {users} threads, evenly spread arrivals, {seconds} s per rate")
    print(f"{'offered':>14}{'tasks':>8}{'submit p50':>12}{'p95':>8}{'p99':>8}{'status p50':>12}{'p95':>8}  ms")
    for rate in rates:
        period = users / rate
        lat: dict[str, list[float]] = {"submit": [], "status": []}
        unfinished: list[str] = []
        start = time.time() + 0.5
        give_up = start + seconds + max(60.0, 2 * seconds)  # a task still not final then is reported

        def user(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
            k = 0
            while (at := start + (i / users + k) * period) < start + seconds:
                k += 1
                time.sleep(max(0.0, at - time.time()))
                t0 = time.perf_counter()
                conn.request("POST", "/v1/async/submit", body=SUBMIT_BODY, headers=app.json_auth)
                r = conn.getresponse()
                task_id = json.loads(r.read())["task_id"]
                lat["submit"].append((time.perf_counter() - t0) * 1000)
                while True:
                    t0 = time.perf_counter()
                    conn.request("GET", f"/v1/async/status/{task_id}", headers=app.json_auth)
                    state = json.loads(conn.getresponse().read())["state"]
                    lat["status"].append((time.perf_counter() - t0) * 1000)
                    if state in ("completed", "failed", "cancelled", "expired"):
                        break
                    if time.time() > give_up:
                        unfinished.append(f"{task_id} ({state})")
                        return
                    time.sleep(0.05)
        threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sub, st = lat["submit"], lat["status"]
        print(f"{f'{rate} tasks/s':>14}{len(sub):>8}{_pct(sub, 50):>12.1f}{_pct(sub, 95):>8.1f}{_pct(sub, 99):>8.1f}"
              f"{_pct(st, 50):>12.1f}{_pct(st, 95):>8.1f}")
        if unfinished:
            print(f"{'':14}{len(unfinished)} task(s) not final {give_up - start - seconds:.0f} s after the last "
                  f"submit, their users stopped: {', '.join(unfinished[:5])}")


def bench_added_latency(app: Appliance, n: int) -> None:
    s = requests.Session()
    s.headers.update(app.auth)  # llama.cpp ignores it
    endpoint = wait_idle(app)["workers"][0]["endpoint"]
    # llama.cpp wants its launcher's key; the API ignores this header (it reads Authorization)
    llama_key = (app.home / "var" / "run" / "llama-0.key").read_text().strip()
    body = {"model": app.settings.model_name, "messages": [{"role": "user", "content": "Vitals stable?"}],
            "max_tokens": 8, "temperature": 0}

    def timed(url):
        headers = {"Authorization": f"Bearer {llama_key}"} if url.startswith(endpoint) else None
        w0, t0 = time.time(), time.perf_counter()
        r = s.post(url, json=body, headers=headers, timeout=60)
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000, w0, time.time(), r.json()["id"]

    for _ in range(20):  # warm both paths
        timed(endpoint + "/v1/chat/completions")
        timed(app.url + "/v1/chat/completions")
    direct, via, legs = [], [], []
    for _ in range(n):  # interleaved, so drift hits both alike
        direct.append(timed(endpoint + "/v1/chat/completions")[0])
        ms, w0, w1, cid = timed(app.url + "/v1/chat/completions")
        via.append(ms)
        st = s.get(f"{app.url}/v1/async/status/{cid.split('-', 1)[1]}", timeout=10).json()
        legs.append(((st["created_at"] - w0) * 1000, (st["started_at"] - st["created_at"]) * 1000,
                     (st["finished_at"] - st["started_at"]) * 1000, (w1 - st["finished_at"]) * 1000))

    pct = _pct
    print(f"\n3. added latency, {n} sequential chat requests (8 tokens) each way, on an idle queue")
    print(f"{'ms':34}{'p50':>8}{'p99':>8}")
    print(f"{'llama.cpp directly':34}{pct(direct, 50):>8.2f}{pct(direct, 99):>8.2f}")
    print(f"{'through the appliance':34}{pct(via, 50):>8.2f}{pct(via, 99):>8.2f}")
    print(f"{'added (difference)':34}{pct(via, 50) - pct(direct, 50):>8.2f}{pct(via, 99) - pct(direct, 99):>8.2f}")
    print("where the appliance's time goes (wall clocks of client and broker, same machine):")
    for i, name in enumerate(("client -> queued (HTTP, API, journal)", "queued -> dispatched",
                              "dispatched -> finished (launcher+llama)", "finished -> client has it")):
        v = [leg[i] for leg in legs]
        print(f"  {name:40}{pct(v, 50):>8.2f}{pct(v, 99):>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--latency-n", type=int, default=500)
    args = ap.parse_args()
    print(f"machine: {cores()}, Python {sys.version.split()[0]}")
    # the buckets are per subject, and here one subject is the whole load: lift them
    # (defaults: a caller's QUEUE_MAX_SIZE or RATE_LIMITS wins)
    app = Appliance(QUEUE_MAX_SIZE=200_000, RATE_LIMITS="tasks:write=1000000/s:1000000,tasks:read=1000000/s:1000000")
    try:
        bench_locust(app, args.users, args.seconds)
        bench_paced_clients(app, args.users, min(args.seconds, 10))
        bench_added_latency(app, args.latency_n)
    finally:
        app.stop()


if __name__ == "__main__":
    main()
