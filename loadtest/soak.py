"""Soak test: a steady mixed load against a running appliance for a long time, while
watching every supervised process for memory and file-descriptor growth.

    APPLIANCE_TOKEN=$(.venv/bin/appliance token --sub soak --scopes tasks:read,tasks:write --ttl 2h)
    .venv/bin/python loadtest/soak.py --url http://127.0.0.1:8000 --home . --seconds 1800

Short benchmarks cannot show a leak that costs a few bytes or one descriptor per
request; half an hour of mixed traffic can. The load mixes what clients do:

  async_complete  POST /v1/async/submit (a `complete` task), poll status, fetch result
  async_chat      the same with a `chat` task
  async_stream    submit a `chat` task, follow GET /v1/async/stream/{id} to its
                  `result` event, then fetch the result
  openai_chat     POST /v1/chat/completions
  openai_stream   POST /v1/chat/completions with "stream": true, read to `data: [DONE]`
  rag_search      a hook for RAG search (`op_rag_search`): the appliance has no RAG
                  endpoint yet, so its weight must stay 0 until one exists

The processes come from the appliance home's supervisord (`supervisorctl status`)
and their children from /proc (gunicorn workers, an external llama-server), read
without psutil so the appliance gains no dependency. RSS and open descriptors are
measured once after --warmup (the baseline) and once at the end, each time with the
load paused and every client connection closed, so that in-flight requests and
keep-alive sockets do not count as growth. In between, one unpaused sample per
--sample-every seconds goes into the JSON report as a time line.

Exit status 1 when: any request failed (non-2xx, an exception, a stream that ended
without its final event), any task failed or was lost (accepted, never seen final
within --drain-seconds after the load stops), a process restarted (its pid changed)
or vanished, or a process grew by more than --max-growth-pct in RSS or descriptors
(unless --no-growth-check, for short runs where warm-up noise dominates).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

try:  # how many finished records the broker keeps in memory: its RSS grows until they are that many
    from appliance.broker.records import FINISHED_CACHE
except ImportError:  # run from elsewhere than the appliance's venv
    FINISHED_CACHE = 10_000

FINAL_STATES = ("completed", "failed", "cancelled", "expired")
# HTTP request kinds: what the counts, errors and latencies are grouped by
KINDS = ("submit", "status", "result", "stream", "chat", "chat_stream")
DEFAULT_MIX = "async_complete=2,async_chat=2,async_stream=1,openai_chat=1,openai_stream=2"
PROMPT = "Summarise: 58 y/o, vitals stable, afebrile."


# ---------------------------------------------------------------- the load

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
            self.stats.add(kind, error=f"http {r.status_code} {_error_code(r)}", detail=path)
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


def _error_code(r: requests.Response) -> str:
    try:
        return r.json()["error"]["code"]
    except Exception:
        return ""


def _chat_body(rng: random.Random, max_tokens: int) -> dict:
    return {"type": "chat", "messages": [{"role": "user", "content": f"{PROMPT} Case {rng.randrange(10**6)}."}],
            "max_tokens": max_tokens}


def op_async_complete(load: Load, s, rng) -> None:
    body = {"type": "complete", "prompt": f"{PROMPT} Case {rng.randrange(10**6)}. Plan:",
            "max_tokens": load.args.max_tokens}
    if task_id := load.submit(s, body):
        load.poll(s, task_id)


def op_async_chat(load: Load, s, rng) -> None:
    if task_id := load.submit(s, _chat_body(rng, load.args.max_tokens)):
        load.poll(s, task_id)


def sse_events(r: requests.Response):
    """(event, data) pairs of a server-sent-events body; comments (keep-alives) skipped."""
    event, data = None, []
    for line in r.iter_lines(decode_unicode=True):
        if line is None:
            continue
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        yield event, "\n".join(data)


def op_async_stream(load: Load, s, rng) -> None:
    task_id = load.submit(s, _chat_body(rng, load.args.max_tokens))
    if not task_id:
        return
    path = f"/v1/async/stream/{task_id}"
    t0 = time.perf_counter()
    try:
        with s.get(load.url + path, stream=True, timeout=load.args.request_timeout) as r:
            if r.status_code != 200:
                load.stats.add("stream", error=f"http {r.status_code} {_error_code(r)}", detail=path)
                return
            final = None
            for event, data in sse_events(r):
                if event == "result":
                    final = json.loads(data)
                elif event == "error":
                    code = json.loads(data).get("error", {}).get("code", "?")
                    load.stats.add("stream", error=f"error event {code}", detail=task_id)
                    return
    except requests.RequestException as exc:
        load.stats.add("stream", error=f"exception {type(exc).__name__}", detail=path)
        return
    if final is None:
        load.stats.add("stream", error="ended without its result event", detail=task_id)
        return
    load.stats.add("stream", (time.perf_counter() - t0) * 1000)
    load.seen_final(task_id, final)
    load.fetch_result(s, task_id)


def _openai_body(load: Load, rng, stream: bool) -> dict:
    return {"model": load.model, "max_tokens": load.args.max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"{PROMPT} Case {rng.randrange(10**6)}."}]}


def op_openai_chat(load: Load, s, rng) -> None:
    r = load.call(s, "chat", "POST", "/v1/chat/completions", json=_openai_body(load, rng, False))
    if r is not None and not r.json()["choices"][0].get("finish_reason"):
        load.stats.add("chat", error="answer without finish_reason")


def op_openai_stream(load: Load, s, rng) -> None:
    """Read to `data: [DONE]`; a stream that stops short is an error, and its task (the
    chunk id names it) joins the ones that must be final by the end."""
    path = "/v1/chat/completions"
    t0 = time.perf_counter()
    task_id, finish, done = None, None, False
    try:
        with s.post(load.url + path, json=_openai_body(load, rng, True), stream=True,
                    timeout=load.args.request_timeout) as r:
            if r.status_code != 200:
                load.stats.add("chat_stream", error=f"http {r.status_code} {_error_code(r)}", detail=path)
                return
            for _, data in sse_events(r):  # read to the end of the body: the connection stays reusable
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    load.stats.add("chat_stream", error=f"error chunk {chunk['error'].get('code')}", detail=path)
                    return
                if task_id is None and chunk.get("id"):
                    task_id = chunk["id"].split("-", 1)[-1]
                    load.tasks.accept(task_id)
                for choice in chunk.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
    except requests.RequestException as exc:
        load.stats.add("chat_stream", error=f"exception {type(exc).__name__}", detail=path)
        return
    if not (done and finish):
        load.stats.add("chat_stream", error="ended without " + ("finish_reason" if done else "[DONE]"),
                       detail=task_id or "")
        return
    load.stats.add("chat_stream", (time.perf_counter() - t0) * 1000)
    if task_id:
        load.tasks.final(task_id, "completed")


def op_rag_search(load: Load, s, rng) -> None:
    """The hook for RAG search, once the appliance has it: a retrieval request (kind
    "rag", add it to KINDS) and, if it answers through a task, its completion."""
    raise NotImplementedError("the appliance has no RAG search endpoint yet")


OPS = {"async_complete": op_async_complete, "async_chat": op_async_chat, "async_stream": op_async_stream,
       "openai_chat": op_openai_chat, "openai_stream": op_openai_stream, "rag_search": op_rag_search}
UNAVAILABLE = {"rag_search": "the appliance has no RAG search endpoint yet; implement op_rag_search when it does"}


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in OPS:
            raise argparse.ArgumentTypeError(f"unknown operation {name!r} (known: {', '.join(OPS)})")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: weight {weight!r} is not a number") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"{name}: negative weight")
        if mix[name] > 0 and name in UNAVAILABLE:
            raise argparse.ArgumentTypeError(f"{name}: {UNAVAILABLE[name]}")
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise argparse.ArgumentTypeError("the mix has no operation with a weight above 0")
    return mix


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


# ---------------------------------------------------------------- the processes

@dataclass
class Proc:
    name: str
    pid: int
    start: int  # /proc/PID/stat starttime: a reused pid is a different process
    rss_kib: int | None = None
    fds: int | None = None
    threads: int | None = None


@dataclass
class Snapshot:
    at: float
    procs: dict[str, Proc] = field(default_factory=dict)
    not_running: dict[str, str] = field(default_factory=dict)  # program -> supervisord state


def _ctl_bin() -> str:
    here = Path(sys.executable).parent / "supervisorctl"
    return str(here) if here.exists() else (shutil.which("supervisorctl") or "supervisorctl")


def supervised(home: Path) -> tuple[int, dict[str, tuple[str, int | None]]]:
    """supervisord's pid, and each program's (state, pid) from `supervisorctl status`."""
    conf = str(home / "supervisord.conf")
    ctl = _ctl_bin()
    pid = subprocess.run([ctl, "-c", conf, "pid"], capture_output=True, text=True, timeout=30).stdout.strip()
    if not pid.isdigit():
        raise RuntimeError(f"supervisorctl -c {conf} pid: {pid or 'no answer'} (is the appliance running?)")
    out = subprocess.run([ctl, "-c", conf, "status"], capture_output=True, text=True, timeout=30).stdout
    programs = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2:
            m = re.search(r"\bpid (\d+)", line)
            programs[words[0]] = (words[1], int(m.group(1)) if m else None)
    for name, (state, p) in programs.items():
        if p is None and state in ("STARTING", "STOPPING"):  # alive, but `status` shows no pid then
            got = subprocess.run([ctl, "-c", conf, "pid", name], capture_output=True, text=True, timeout=30)
            if got.stdout.strip().isdigit() and int(got.stdout) > 0:
                programs[name] = (state, int(got.stdout))
    return int(pid), programs


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) from /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), int(rest[19])


def _measure(p: Proc) -> None:
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    p.rss_kib = int(line.split()[1])
                elif line.startswith("Threads:"):
                    p.threads = int(line.split()[1])
        p.fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    except (OSError, ValueError):
        pass  # gone, or another user's: left None and reported


def program_label(program: str) -> str:
    """supervisord's name to the report's: `llama:llama-0` -> `llama-0`, `api` -> `api master`."""
    name = program.split(":", 1)[-1]
    return "api master" if name == "api" else name


def child_label(parent: str, i: int, n: int) -> str:
    if parent == "api master":
        return f"api worker {i}"
    if parent.startswith("llama") and n == 1:
        return f"{parent} server"
    return f"{parent} child {i}"


def snapshot(home: Path, previous: Snapshot | None = None) -> Snapshot:
    """Every supervised process and its descendants, named and measured.

    Children are numbered in start order; with `previous`, a child still alive keeps
    its name and a replacement takes the name of the one it replaced, so a restarted
    gunicorn worker shows as `api worker 2` with a new pid."""
    sup_pid, programs = supervised(home)
    children: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            children[st[0]].append((st[1], int(entry)))
    snap = Snapshot(at=time.time())
    own = _stat(sup_pid)
    if own:
        snap.procs["supervisord"] = Proc("supervisord", sup_pid, own[1])
    prev = previous.procs if previous else {}

    def add_children(label: str, pid: int) -> None:
        kids = sorted(children.get(pid, []))
        names = [child_label(label, i + 1, len(kids)) for i in range(len(kids))]
        taken: dict[int, str] = {}
        for start, kid in kids:  # survivors keep their names
            for name in names:
                if name in prev and (prev[name].pid, prev[name].start) == (kid, start):
                    taken[kid] = name
        free = [n for n in names if n not in taken.values()]
        for start, kid in kids:
            name = taken.get(kid) or free.pop(0)
            snap.procs[name] = Proc(name, kid, start)
            add_children(name, kid)

    for program, (state, pid) in sorted(programs.items()):
        label = program_label(program)
        st = _stat(pid) if pid else None
        if state not in ("RUNNING", "STARTING") or st is None:  # STARTING: alive, within its startsecs
            snap.not_running[label] = state
            continue
        snap.procs[label] = Proc(label, pid, st[1])
        add_children(label, pid)
    for p in snap.procs.values():
        _measure(p)
    return snap


# ---------------------------------------------------------------- the verdicts (pure)

def growth_pct(base: float | None, end: float | None) -> float | None:
    """Growth from base to end in %; None when either is unknown."""
    if base is None or end is None:
        return None
    if base <= 0:
        return 0.0 if end <= base else math.inf
    return (end - base) / base * 100


def growth_verdict(base: float | None, end: float | None, max_pct: float,
                   slack: float = 0) -> tuple[float | None, bool]:
    """(growth %, within the bound): at most `max_pct`, or at most `slack` in absolute
    terms. An unknown figure is not a pass: it cannot be checked."""
    pct = growth_pct(base, end)
    return pct, pct is not None and (pct <= max_pct or end - base <= slack)


def judge_processes(start: Snapshot, baseline: Snapshot, end: Snapshot, max_growth_pct: float,
                    growth_check: bool = True, fd_slack: int = 0) -> list[dict]:
    """One row per process: baseline and end figures, growth, PASS/FAIL and why.

    A process whose pid (or start time) differs between the first snapshot and the
    last restarted; one missing at the end vanished; one that appears only at the end
    was not there to compare with. All three fail, whatever the growth."""
    rows = []
    for name in sorted(set(start.procs) | set(baseline.procs) | set(end.procs) | set(end.not_running),
                       key=_order):
        s, b, e = start.procs.get(name), baseline.procs.get(name), end.procs.get(name)
        why = []
        first = s or b
        if e is None:
            why.append(f"not running at the end ({end.not_running.get(name, 'gone')})")
        elif first is None:
            why.append(f"appeared during the run (pid {e.pid})")
        elif (first.pid, first.start) != (e.pid, e.start):
            why.append(f"restarted (pid {first.pid} -> {e.pid})")
        elif b and (b.pid, b.start) != (e.pid, e.start):
            why.append(f"restarted (pid {b.pid} -> {e.pid})")
        rss_pct, rss_ok = growth_verdict(b and b.rss_kib, e and e.rss_kib, max_growth_pct)
        fd_pct, fd_ok = growth_verdict(b and b.fds, e and e.fds, max_growth_pct, fd_slack)
        rss_pct, fd_pct = _round(rss_pct), _round(fd_pct)  # the table and the reason show the same figure
        grew = []
        if b and e and not why:
            if not rss_ok:
                grew.append("RSS " + ("unreadable" if rss_pct is None else f"+{rss_pct:.1f}%"))
            if not fd_ok:
                grew.append("FDs " + ("unreadable" if fd_pct is None else f"+{fd_pct:.1f}%"))
        if growth_check:
            why += [g if "unreadable" in g else f"{g} > {max_growth_pct:g}%" for g in grew]
            note = ""
        else:
            note = ("growth not checked: " + ", ".join(grew)) if grew else ""
        rows.append({
            "name": name, "pid_baseline": b.pid if b else None, "pid_end": e.pid if e else None,
            "rss_mib_baseline": _mib(b), "rss_mib_end": _mib(e), "rss_growth_pct": rss_pct,
            "fds_baseline": b.fds if b else None, "fds_end": e.fds if e else None, "fds_growth_pct": fd_pct,
            "threads_baseline": b.threads if b else None, "threads_end": e.threads if e else None,
            "verdict": "FAIL" if why else "PASS", "why": "; ".join(why) or note,
        })
    return rows


def _order(name: str):
    fixed = ["supervisord", "broker", "gpumon", "api master"]
    return (fixed.index(name) if name in fixed else len(fixed), _natural(name))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _mib(p: Proc | None) -> float | None:
    return None if p is None or p.rss_kib is None else round(p.rss_kib / 1024, 1)


def _round(x: float | None) -> float | None:
    return None if x is None else (x if math.isinf(x) else round(x, 2))


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def failures(report: dict) -> list[str]:
    """Why the run failed; empty when it passed. The exit status is 1 unless empty."""
    why = []
    for kind, reasons in report["errors"].items():
        for reason, n in reasons.items():
            why.append(f"{n} error(s) {kind}: {reason}")
    if report["tasks"]["lost"]:
        why.append(f"{report['tasks']['lost']} task(s) lost")
    for row in report["processes"]:
        if row["verdict"] == "FAIL":
            why.append(f"{row['name']}: {row['why']}")
    if not sum(k["count"] for k in report["requests"].values()):
        why.append("no request was made")
    return why


def build_report(args, load: Load, lost: list[str], rows: list[dict], seconds: float, samples: list[dict],
                 notes: list[str]) -> dict:
    st = load.stats
    errors = {k: dict(v) for k, v in st.errors.items() if v}
    if lost:
        errors.setdefault("task", {})["lost"] = len(lost)
    requests_ = {}
    for kind in KINDS:
        n_err = sum(st.errors.get(kind, {}).values())
        requests_[kind] = {"count": st.count[kind], "errors": n_err,
                           "p50_ms": _round(pct(st.ms[kind], 50)), "p95_ms": _round(pct(st.ms[kind], 95))}
    report = {
        "url": load.url, "model": load.model, "seconds": round(seconds, 1),
        "settings": {k: getattr(args, k) for k in ("seconds", "warmup", "clients", "rate", "mix", "max_tokens",
                                                   "max_growth_pct", "fd_slack", "growth_check",
                                                   "drain_seconds")},
        "requests": requests_, "errors": errors, "error_examples": st.examples,
        "tasks": {"accepted": load.tasks.accepted, "final": dict(load.tasks.states), "lost": len(lost),
                  "lost_ids": lost[:50]},
        "processes": rows, "samples": samples,
        "notes": notes,
    }
    report["failures"] = failures(report)
    report["ok"] = not report["failures"]
    return report


def format_report(report: dict) -> str:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    out = [f"soak: {report['seconds']:.0f} s against {report['url']} (model {report['model']}), "
           f"{report['settings']['clients']} clients, mix {report['settings']['mix']}", ""]
    out.append(f"{'request kind':<14}{'count':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for kind, r in report["requests"].items():
        out.append(f"{kind:<14}{r['count']:>9}{r['errors']:>8}{f(r['p50_ms']):>9}{f(r['p95_ms']):>9}")
    t = report["tasks"]
    finals = ", ".join(f"{k} {v}" for k, v in sorted(t["final"].items())) or "none"
    out += ["", f"tasks: {t['accepted']} accepted, final: {finals}; lost {t['lost']}"]
    if t["lost_ids"]:
        out.append("  lost: " + ", ".join(t["lost_ids"][:10]) + (" ..." if t["lost"] > 10 else ""))
    if report["errors"]:
        out.append("errors:")
        for kind, reasons in report["errors"].items():
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
                out.append(f"  {kind:<12}{n:>7}  {reason}")
        out += [f"  e.g. {e}" for e in report["error_examples"][:5]]
    else:
        out.append("errors: none")
    max_pct = report["settings"]["max_growth_pct"]
    check = (f"bound {max_pct:g}%, or +{report['settings']['fd_slack']} FDs" if report["settings"]["growth_check"]
             else "growth not checked: --no-growth-check")
    out += ["", f"processes (baseline after warm-up -> end, both with the load paused; {check})",
            f"{'process':<18}{'pid':>8}{'RSS MiB':>9}{'->':>8}{'grow%':>8}{'FDs':>6}{'->':>6}{'grow%':>8}"
            f"{'thr':>5}{'->':>4}  verdict"]
    for r in report["processes"]:
        pid = r["pid_end"] or r["pid_baseline"]
        out.append(f"{r['name']:<18}{f(pid, 'd'):>8}{f(r['rss_mib_baseline']):>9}{f(r['rss_mib_end']):>8}"
                   f"{f(r['rss_growth_pct'], '+.1f'):>8}{f(r['fds_baseline'], 'd'):>6}{f(r['fds_end'], 'd'):>6}"
                   f"{f(r['fds_growth_pct'], '+.1f'):>8}{f(r['threads_baseline'], 'd'):>5}"
                   f"{f(r['threads_end'], 'd'):>4}  {r['verdict']}" + (f"  ({r['why']})" if r["why"] else ""))
    out += [f"note: {n}" for n in report["notes"]]
    out += ["", "PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"][:10])]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def as_sample(snap: Snapshot, at0: float, phase: str) -> dict:
    """A snapshot as a point of the JSON report's time line."""
    return {"t_s": round(snap.at - at0, 1), "phase": phase,
            "procs": {n: {"pid": p.pid, "rss_kib": p.rss_kib, "fds": p.fds, "threads": p.threads}
                      for n, p in snap.procs.items()}}


def measured(load: Load, home: Path, previous: Snapshot, unparked: list[int], last: bool = False) -> Snapshot:
    """A snapshot with every client paused and disconnected; then the load goes on,
    or, for the `last` one, the clients end."""
    unparked.append(load.quiesce(load.args.task_wait + load.args.request_timeout + 5))
    time.sleep(load.args.settle)  # the API workers close the sockets the clients just closed
    snap = snapshot(home, previous)
    if last:
        load.stop.set()
    load.go_on()
    return snap


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the appliance's API")
    ap.add_argument("--token", default=os.environ.get("APPLIANCE_TOKEN", ""),
                    help="bearer token with tasks:read and tasks:write (default: $APPLIANCE_TOKEN)")
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("APPLIANCE_HOME", ".")),
                    help="the appliance home, where supervisord.conf is (default: $APPLIANCE_HOME, else .)")
    ap.add_argument("--seconds", type=float, default=1800, help="length of the load, warm-up included (default 1800)")
    ap.add_argument("--warmup", type=float, default=60, help="seconds of load before the baseline is measured (default 60)")
    ap.add_argument("--clients", type=int, default=4, help="client threads, one HTTP session each (default 4)")
    ap.add_argument("--rate", type=float, default=40,
                    help="operations per second over all clients (default 40; 0: as fast as they can). One "
                         "token is one subject, and the default RATE_LIMITS allow it 100 tasks:write/s: "
                         "beyond that the API answers 429, which counts as an error")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                    help=f"operations and their weights (default {DEFAULT_MIX}); rag_search is a hook "
                         "for RAG search, which the appliance does not have yet: its weight must be 0")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", help="the model the OpenAI calls name (default: the first of GET /v1/models)")
    ap.add_argument("--max-growth-pct", type=float, default=5.0,
                    help="largest RSS or descriptor growth per process, baseline to end, that passes (default 5)")
    ap.add_argument("--fd-slack", type=int, default=4,
                    help="descriptors a process may gain whatever the %% bound (default 4): each API worker "
                         "pools its broker connections, 2 descriptors each, up to its peak concurrency, which "
                         "the warm-up need not have reached; a leak passes it soon enough")
    ap.add_argument("--no-growth-check", dest="growth_check", action="store_false",
                    help="report growth but do not fail on it (short runs: warm-up noise dominates)")
    ap.add_argument("--poll-interval", type=float, default=0.05, help="seconds between status polls")
    ap.add_argument("--task-wait", type=float, default=60,
                    help="how long a client polls one task before leaving it to the end's drain")
    ap.add_argument("--drain-seconds", type=float, default=120,
                    help="after the load, how long tasks not yet final get before they count as lost")
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--sample-every", type=float, default=60, help="seconds between time-line samples (JSON)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between pausing the clients and measuring")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    if not args.token:
        ap.error("no token: pass --token or set APPLIANCE_TOKEN (`appliance token --sub soak "
                 "--scopes tasks:read,tasks:write --ttl 2h`)")
    if not (args.home / "supervisord.conf").is_file():
        ap.error(f"no supervisord.conf in {args.home} (--home is the appliance home)")
    if args.warmup >= args.seconds:
        ap.error("--warmup must be shorter than --seconds")
    if args.clients < 1:
        ap.error("--clients must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {args.token}"
    try:
        r = s.get(args.url.rstrip("/") + "/v1/models", timeout=10)
    except requests.RequestException as exc:
        print(f"soak: {args.url} does not answer ({type(exc).__name__})", file=sys.stderr)
        return 2
    if r.status_code != 200:
        print(f"soak: GET /v1/models answered {r.status_code} {_error_code(r)} (check the token)", file=sys.stderr)
        return 2
    model = args.model or r.json()["data"][0]["id"]
    s.close()

    load = Load(args, model)
    home = args.home.resolve()
    start = snapshot(home)
    t0 = time.time()
    print(f"soak: {args.seconds:.0f} s ({args.warmup:.0f} s warm-up), {args.clients} clients against {args.url}, "
          f"processes: {', '.join(sorted(start.procs, key=_order))}", flush=True)
    threads = [threading.Thread(target=load.client, args=(args.seed * 1000 + i,), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    unparked: list[int] = []
    samples = [as_sample(start, t0, "start")]
    baseline, notes = None, []
    warm_at, end_at = t0 + args.warmup, t0 + args.seconds
    next_sample = t0 + args.sample_every
    while (now := time.time()) < end_at:
        if baseline is None and now >= warm_at:
            baseline = measured(load, home, start, unparked)
            samples.append(as_sample(baseline, t0, "baseline"))
            if (warm := load.tasks.accepted) < FINISHED_CACHE:
                rate = warm / max(args.warmup, 1e-9)
                fill = f"~{FINISHED_CACHE / rate:.0f} s at this rate" if rate else "never, at no load"
                notes.append(f"the warm-up ran {warm} tasks; the broker keeps the {FINISHED_CACHE:,} newest "
                             f"finished records in memory, so its RSS grows until that many have run ({fill}): "
                             "a --warmup that long makes its growth figure mean something")
        elif now >= next_sample:
            samples.append(as_sample(snapshot(home), t0, "warm-up" if baseline is None else "load"))
            print(f"soak: {now - t0:.0f} s, {sum(load.stats.count.values())} requests, "
                  f"{sum(sum(c.values()) for c in load.stats.errors.values())} errors", flush=True)
            next_sample += args.sample_every
        else:
            time.sleep(max(0.0, min(end_at, next_sample, warm_at if baseline is None else end_at) - now))
    if baseline is None:  # the warm-up ended as the run did (a snapshot took that long)
        baseline = measured(load, home, start, unparked)
    final = measured(load, home, baseline, unparked, last=True)
    samples.append(as_sample(final, t0, "end"))
    for t in threads:
        t.join(args.task_wait + args.request_timeout + 5)
    seconds = time.time() - t0
    lost = drain(load, args.drain_seconds)
    rows = judge_processes(start, baseline, final, args.max_growth_pct, args.growth_check, args.fd_slack)
    notes += [f"{n} client(s) had not paused when a measurement was taken" for n in unparked if n]
    report = build_report(args, load, lost, rows, seconds, samples, notes)
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
