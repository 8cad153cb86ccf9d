"""The soak's clients: the state their threads share (counts, errors, latencies, the
open tasks), the paced client loop, the pause with which the main thread quiesces
them for a measurement, and the drain that tells a slow task from a lost one.

The operations themselves, and the mix that picks among them, are in soak_ops.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict

import requests

from soak_ops import OPS, error_code

FINAL_STATES = ("completed", "failed", "cancelled", "expired")
# HTTP request kinds: what the counts, errors and latencies are grouped by
KINDS = ("submit", "status", "result", "stream", "chat", "chat_stream", "rag")


class Stats:
    """Counts, errors and latencies by request kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[str] = Counter()
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.examples: list[str] = []  # the first few errors verbatim, for the report

    def add(self, kind: str, ms: float | None = None, error: str | None = None, detail: str = "") -> None:
        with self.lock:
            if kind in KINDS:
                self.count[kind] += 1
            if error:
                self.errors[kind][error] += 1
                if len(self.examples) < 20:
                    self.examples.append(f"{kind}: {error}{' — ' + detail if detail else ''}")
            elif ms is not None:
                self.ms[kind].append(ms)


class Tasks:
    """Every accepted task id until it is seen final: what is left at the end is lost."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[str] = set()
        self.accepted = 0
        self.states: Counter[str] = Counter()

    def accept(self, task_id: str) -> None:
        with self.lock:
            self.open.add(task_id)
            self.accepted += 1

    def final(self, task_id: str, state: str) -> bool:
        """Record a task's final state; False if it was already recorded."""
        with self.lock:
            if task_id not in self.open:
                return False
            self.open.discard(task_id)
            self.states[state] += 1
            return True


class Load:
    """What the client threads share: settings, stats, the task registry, and the
    pause/stop signals with which the main thread quiesces them for a measurement."""

    def __init__(self, args, model: str):
        self.url = args.url.rstrip("/")
        self.token = args.token
        self.model = model
        self.args = args
        self.stats = Stats()
        self.tasks = Tasks()
        self.stop = threading.Event()
        self.pause = threading.Event()
        self.resume = threading.Event()
        self.parked = 0
        self.parked_lock = threading.Lock()
        names, weights = zip(*args.mix.items())
        self.op_names, self.op_weights = list(names), list(weights)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {self.token}"
        return s

    def call(self, s: requests.Session, kind: str, method: str, path: str, **kw) -> requests.Response | None:
        """One request, counted; the response when 2xx, else None (the error is recorded)."""
        t0 = time.perf_counter()
        try:
            r = s.request(method, self.url + path, timeout=self.args.request_timeout, **kw)
        except requests.RequestException as exc:
            self.stats.add(kind, error=f"exception {type(exc).__name__}", detail=path)
            return None
        ms = (time.perf_counter() - t0) * 1000
        if not 200 <= r.status_code < 300:
            self.stats.add(kind, error=f"http {r.status_code} {error_code(r)}", detail=path)
            return None
        self.stats.add(kind, ms)
        return r

    # -- the client thread

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        s = self.session()
        period = self.args.clients / self.args.rate if self.args.rate else 0.0
        next_at = time.monotonic()
        while not self.stop.is_set():
            if self.pause.is_set():
                s.close()  # no keep-alive socket may count in the measurement
                with self.parked_lock:
                    self.parked += 1
                self.resume.wait()
                with self.parked_lock:
                    self.parked -= 1
                s = self.session()
                next_at = time.monotonic()
                continue
            op = rng.choices(self.op_names, self.op_weights)[0]
            try:
                OPS[op](self, s, rng)
            except Exception as exc:  # a bug in an op or a malformed answer: an error, not a dead client
                self.stats.add("op", error=f"{op}: exception {type(exc).__name__}", detail=str(exc)[:200])
            if period:  # paced; a client that fell behind starts afresh rather than bursting
                next_at = max(next_at + period, time.monotonic() - period)
                self.stop.wait(max(0.0, next_at - time.monotonic()))
        s.close()

    def quiesce(self, timeout: float) -> int:
        """Pause every client after its current operation; the number that did not park in time."""
        self.resume.clear()
        self.pause.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.parked_lock:
                if self.parked >= self.args.clients:
                    return 0
            time.sleep(0.05)
        with self.parked_lock:
            return self.args.clients - self.parked

    def go_on(self) -> None:
        self.pause.clear()
        self.resume.set()

    # -- pieces of the operations

    def submit(self, s, body: dict) -> str | None:
        r = self.call(s, "submit", "POST", "/v1/async/submit", json=body)
        if r is None:
            return None
        task_id = r.json()["task_id"]
        self.tasks.accept(task_id)
        return task_id

    def seen_final(self, task_id: str, rec: dict) -> None:
        if self.tasks.final(task_id, rec["state"]) and rec["state"] != "completed":
            code = (rec.get("error") or {}).get("code", rec["state"])
            self.stats.add("task", error=f"{rec['state']} {code}", detail=task_id)

    def poll(self, s, task_id: str) -> bool:
        """Status until final (then fetch the result), for up to --task-wait seconds; a
        task not final by then is left to the drain at the end."""
        deadline = time.monotonic() + self.args.task_wait
        while True:
            r = self.call(s, "status", "GET", f"/v1/async/status/{task_id}")
            if r is None:
                return False
            if r.json()["state"] in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(self.args.poll_interval)
        return self.fetch_result(s, task_id)

    def fetch_result(self, s, task_id: str) -> bool:
        r = self.call(s, "result", "GET", f"/v1/async/result/{task_id}")
        if r is None:
            return False
        if r.status_code != 200:  # 202: the status said final, the result says not yet
            self.stats.add("task", error=f"result {r.status_code} after a final status", detail=task_id)
            return False
        self.seen_final(task_id, r.json())
        return True


def drain(load: Load, seconds: float) -> list[str]:
    """After the load: poll every task not yet seen final until it is, or `seconds`
    pass; the ids still open then are lost."""
    s = load.session()
    deadline = time.monotonic() + seconds
    while True:
        with load.tasks.lock:
            left = sorted(load.tasks.open)
        if not left or time.monotonic() > deadline:
            s.close()
            return left
        for task_id in left:
            try:
                r = s.get(f"{load.url}/v1/async/status/{task_id}", timeout=load.args.request_timeout)
            except requests.RequestException:
                continue
            if r.status_code == 200 and r.json()["state"] in FINAL_STATES:
                rec = r.json()
                load.seen_final(task_id, rec)
        time.sleep(0.5)
