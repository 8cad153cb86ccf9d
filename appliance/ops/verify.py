"""`appliance verify`: the production checks, as real probes of the running appliance.

Each check asks the part itself (over HTTP on loopback, as a client would) and says
✓ or ✗ with the reason; the command exits 1 when any fails, so a deployment script or
a monitor can run it. The checks are the system description's: the API answering
fast, the broker, every instance, the GPU monitor, one task through the queue, the
metrics scrape, the secrets, the journal and the disk.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import security
from ..config import ConfigError, Settings

HEALTH_BUDGET_MS = 100.0
TASK_WAIT_S = 30.0
DISK_MIN_FREE = 0.10       # of the filesystem
DISK_MIN_FREE_BYTES = 2**30


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Http:
    """A tiny loopback client (the runtime has no `requests`): JSON in, (status, JSON or text) out."""

    def __init__(self, s: Settings, token: str | None):
        host = "127.0.0.1" if s.api_host in ("0.0.0.0", "", "::") else s.api_host
        self.base = f"http://{host}:{s.api_port}"
        self.token = token

    def call(self, method: str, path: str, body=None, timeout: float = 5.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


def _error(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{body['error'].get('code')}: {body['error'].get('message')}"
    return str(body)[:200]


def check_api(http: Http) -> Check:
    best = None
    for _ in range(3):  # the best of three: a probe, not a benchmark
        t0 = time.perf_counter()
        status, _ = http.call("GET", "/healthz")
        ms = (time.perf_counter() - t0) * 1000
        if status != 200:
            return Check("api", False, f"/healthz answered {status}")
        best = ms if best is None else min(best, ms)
    ok = best <= HEALTH_BUDGET_MS
    return Check("api", ok, f"/healthz answered in {best:.1f} ms" + ("" if ok else f" (over {HEALTH_BUDGET_MS:g} ms)"))


def check_broker(http: Http) -> Check:
    status, body = http.call("GET", "/readyz")
    if status == 200:
        return Check("broker", True, f"ready: {body.get('workers_ready')} instances registered, "
                                     f"{body.get('queued')} queued, {body.get('running')} running")
    return Check("broker", False, f"/readyz {status}: {_error(body)}")


def check_instances(http: Http) -> Check:
    status, body = http.call("GET", "/v1/instances")
    if status != 200:
        return Check("instances", False, f"/v1/instances {status}: {_error(body)}")
    # registered with the broker is serving; supervisord says STARTING for its first startsecs
    down = [f"{i['name']} ({i['state']}{', not registered' if not i['registered'] else ''})"
            for i in body["instances"] if not i["registered"] or i["state"] not in ("RUNNING", "STARTING")]
    if down:
        return Check("instances", False, "not serving: " + ", ".join(down))
    return Check("instances", True, ", ".join(f"{i['name']} {i['model']} {i['slots']['total']} slots"
                                                for i in body["instances"]))


def check_gpu(http: Http, s: Settings) -> Check:
    status, body = http.call("GET", "/v1/gpu/status")
    if status != 200:
        return Check("gpu monitor", False, f"/v1/gpu/status {status}: {_error(body)}")
    ts = body.get("ts")
    if ts is None or time.time() - ts > max(10.0, 5 * s.gpumon_interval_s):
        return Check("gpu monitor", False, "no recent telemetry from gpumon")
    if body["cpu_only"]:
        return Check("gpu monitor", True, f"publishing; CPU only: {body['reason']}")
    hot = [f"GPU {g['index']}: {g['throttle_reason']}" for g in body["gpus"] if g["throttled"]]
    gpus = ", ".join(f"GPU {g['index']} {g['name']} {g['temperature_c']:.0f} °C" for g in body["gpus"])
    return Check("gpu monitor", not hot, gpus + ("; throttled: " + "; ".join(hot) if hot else ""))


def check_task(http: Http) -> Check:
    t0 = time.monotonic()
    status, body = http.call("POST", "/v1/async/submit", {"type": "complete", "prompt": "verify",
                                                          "max_tokens": 1, "priority": "high"})
    if status != 202:
        return Check("task", False, f"submit {status}: {_error(body)}")
    task_id = body["task_id"]
    while time.monotonic() - t0 < TASK_WAIT_S:
        status, body = http.call("GET", f"/v1/async/status/{task_id}")
        if status == 200 and body["state"] in ("completed", "failed", "cancelled", "expired"):
            ok = body["state"] == "completed"
            why = "" if ok else f" ({(body.get('error') or {}).get('code')})"
            return Check("task", ok, f"{body['state']}{why} in {(time.monotonic() - t0) * 1000:.0f} ms "
                                     f"on {body.get('worker')}")
        time.sleep(0.05)
    return Check("task", False, f"task {task_id} not final within {TASK_WAIT_S:g} s")


def check_metrics(http: Http) -> Check:
    status, body = http.call("GET", "/metrics")
    if status != 200 or not isinstance(body, str):
        return Check("metrics", False, f"/metrics answered {status}")
    families = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}
    missing = [p for p in ("appliance_api_", "appliance_broker_") if not any(f.startswith(p) for f in families)]
    if missing:
        return Check("metrics", False, f"/metrics lacks {', '.join(missing)}* families")
    return Check("metrics", True, f"{len(families)} metric families")


def check_secrets(s: Settings) -> Check:
    try:
        warnings = security.check_startup(s)
    except ConfigError as exc:
        return Check("secrets", False, str(exc))
    if warnings:
        return Check("secrets", False, "; ".join(warnings))
    return Check("secrets", True, f"{s.jwt_algorithm} key and audit key set and strong")


def check_journal(http: Http, s: Settings) -> Check:
    path = s.journal_path  # PostgreSQL: user@host:port/db, never the password
    if s.journal_sqlite:
        file = Path(path)
        if not os.access(file.parent, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
            return Check("journal", False, f"{path} is not writable by this user")
    status, body = http.call("GET", "/v1/async/stats")
    if status != 200:
        return Check("journal", False, f"/v1/async/stats {status}: {_error(body)}")
    errors = body.get("journal_errors", 0)
    return Check("journal", errors == 0, f"{path}: " + ("writable, no failed writes" if errors == 0 else
                                                       f"{errors} failed writes since the broker started"))


def check_disk(s: Settings) -> Check:
    seen, worst = set(), []
    for d in (s.data_dir, s.log_dir):
        usage = shutil.disk_usage(d)
        if (usage.total, usage.free) in seen:
            continue
        seen.add((usage.total, usage.free))
        frac = usage.free / usage.total
        worst.append((frac, d, usage.free))
    low = [f"{d}: {free / 2**30:.1f} GiB free ({frac:.0%})" for frac, d, free in worst
           if frac < DISK_MIN_FREE or free < DISK_MIN_FREE_BYTES]
    if low:
        return Check("disk", False, "low: " + "; ".join(low))
    return Check("disk", True, "; ".join(f"{d}: {free / 2**30:.1f} GiB free ({frac:.0%})" for frac, d, free in worst))


# Checks answered through the broker: with the broker not answering, each would wait
# BROKER_TIMEOUT_S (5 s) to say the same thing.
NEED_BROKER = frozenset({"instances", "gpu monitor", "task", "journal"})


def run(s: Settings, token: str | None) -> list[Check]:
    http = Http(s, token)
    checks: list[Check] = []
    probes = (("api", lambda: check_api(http)), ("broker", lambda: check_broker(http)),
              ("instances", lambda: check_instances(http)), ("gpu monitor", lambda: check_gpu(http, s)),
              ("task", lambda: check_task(http)), ("metrics", lambda: check_metrics(http)),
              ("secrets", lambda: check_secrets(s)), ("journal", lambda: check_journal(http, s)),
              ("disk", lambda: check_disk(s)))
    broker_gone = False
    for name, probe in probes:
        if broker_gone and name in NEED_BROKER:  # each would wait BROKER_TIMEOUT_S for the same answer
            checks.append(Check(name, False, "not checked: the broker is not answering (see broker)"))
            continue
        try:
            checks.append(probe())
        except (OSError, ValueError, KeyError, TypeError) as exc:  # the API not there at all, or nonsense
            checks.append(Check(name, False, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"))
        if name == "broker":
            broker_gone = not checks[-1].ok and "broker_unavailable" in checks[-1].detail
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'✓' if c.ok else '✗'} {c.name:<{width}}  {c.detail}" for c in checks)


def default_token(s: Settings) -> str | None:
    """A short-lived token for the probes, minted from the appliance's own HS256 secret;
    with RS256/ES256 the appliance holds no private key: pass --token."""
    if s.jwt_algorithm != "HS256" or not s.jwt_secret_key:
        return None
    return security.mint_token(s, "appliance-verify", ["tasks:read", "tasks:write", "gpu:read"], 120)
