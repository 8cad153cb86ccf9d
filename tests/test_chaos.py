"""Chaos: nothing acknowledged is lost, whatever dies.

One appliance with two instances of a model slow enough to interrupt: llama-0 runs
llama.cpp embedded in its launcher, llama-1 an external `llama-server` process (the
shim in tests/support, llama.cpp's own server from the same wheel). Each has its own
model id, so a test can put a task on the instance it is about to hurt. Under a
steady submit load, in turn: SIGKILL the broker, one gunicorn worker, the gunicorn
master, the embedded launcher, the external llama.cpp server; SIGSTOP then SIGCONT a
launcher and the broker; then a drain (`appliance down` with work running and queued)
and a fresh start. After each fault, checked against the recorded history: every
submit answered 202 reaches a final state (a task that was running where the fault
hit may run twice, by design: its record says `attempts: 2`), supervisord brings the
process back within RESTART_S, and streams of tasks hit by the fault end with an error
event that says why, never silently.

The table of what happened is printed at the end (`pytest -s`), and written to the
file named by CHAOS_REPORT if set (README, "Reliability").
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Appliance, appliance_env, make_home, wait_until

FAST = {"type": "complete", "prompt": "the patient", "max_tokens": 8}
LONG_TOKENS = 1500     # a few seconds on this model: long enough to be hit
RESTART_S = 5.0        # supervisord brings a killed process back within this
SETTLE_S = 60.0        # every accepted task is final within this after its fault
FINAL = {"completed", "failed", "cancelled", "expired"}
MODELS = ("chaos-a", "chaos-b")  # llama-0 (embedded), llama-1 (external)


# ------------------------------------------------------------------ the history
class History:
    """Every submit and what it got: the record the final states are checked against."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted: dict[str, str] = {}   # task id -> phase it was accepted in
        self.answers: Counter = Counter()    # (phase, answer) -> count
        self.accepted_at: list[tuple[float, str]] = []
        self.phase = "warm-up"

    def ok(self, task_id: str) -> None:
        with self.lock:
            self.accepted[task_id] = self.phase
            self.accepted_at.append((time.monotonic(), task_id))
            self.answers[(self.phase, "202")] += 1

    def other(self, answer: str) -> None:
        with self.lock:
            self.answers[(self.phase, answer)] += 1

    def first_accept_after(self, t: float) -> float | None:
        with self.lock:
            return next((at for at, _ in self.accepted_at if at > t), None)

    def in_phase(self, phase: str) -> list[str]:
        with self.lock:
            return [t for t, p in self.accepted.items() if p == phase]


class Load:
    """Submitters posting small tasks to both models, without pause but one at a time each."""

    def __init__(self, url: str, headers: dict, history: History, threads: int = 3):
        self.url, self.headers, self.history = url, headers, history
        self.stop_ = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        s = requests.Session()
        s.headers.update(self.headers)
        n = 0
        while not self.stop_.is_set():
            n += 1
            try:
                r = s.post(self.url + "/v1/async/submit", json={**FAST, "model": MODELS[(i + n) % 2]}, timeout=10)
            except requests.RequestException as exc:
                self.history.other(type(exc).__name__)  # no answer: not acknowledged
                time.sleep(0.05)
                continue
            if r.status_code == 202:
                self.history.ok(r.json()["task_id"])
            else:
                code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith(
                    "application/json") else None
                self.history.other(f"{r.status_code} {code}")
                if r.status_code in (429, 503):
                    assert r.headers.get("Retry-After"), (r.status_code, code)
                time.sleep(0.05)
            time.sleep(0.02)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_.set()
        for t in self.threads:
            t.join(15)


class Stream:
    """One SSE stream read to its end in a thread: how it ended is what a client sees."""

    def __init__(self, app, kind: str, model: str, history: History):
        self.app, self.kind, self.model, self.history = app, kind, model, history
        self.end: str | None = None   # "result", "done", "error:<code>", "cut:<why>"
        self.tokens = 0
        self.task_id: str | None = None
        if kind == "async":
            self.task_id = app.post("/v1/async/submit", json={"type": "complete", "prompt": "the patient",
                                                               "max_tokens": LONG_TOKENS, "model": model}).json()["task_id"]
            history.ok(self.task_id)  # in the history like any acknowledged task
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            if self.kind == "async":
                r = requests.get(f"{self.app.url}/v1/async/stream/{self.task_id}", headers=self.app.auth(),
                                 stream=True, timeout=30)
            else:
                r = requests.post(f"{self.app.url}/v1/chat/completions", headers=self.app.auth(), stream=True,
                                  timeout=30, json={"model": self.model, "stream": True, "max_tokens": LONG_TOKENS,
                                                    "messages": [{"role": "user", "content": "the patient"}]})
            event = None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        self.end = self.end or "done"
                        return
                    body = json.loads(data)
                    if self.task_id is None and "id" in body:  # chatcmpl-<task id>
                        self.task_id = body["id"].rpartition("-")[2]
                        self.history.ok(self.task_id)
                    if "error" in body:
                        self.end = f"error:{body['error']['code']}"
                        if self.kind == "async":
                            return
                    elif event == "result":
                        self.end = "result"
                        return
                    else:
                        self.tokens += 1
            self.end = self.end or "cut:no final event"
        except requests.RequestException as exc:
            self.end = self.end or f"cut:{type(exc).__name__}"

    def running(self) -> bool:
        return self.tokens >= 3

    def ended(self, timeout: float) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.kind} stream still open {timeout}s after the fault (a hang)"
        return self.end


# ------------------------------------------------------------------ the appliance
def chaos_home(tmp: Path) -> tuple[Path, dict]:
    from appliance.llama.tinymodel import TinySpec, write_tiny_model

    home = make_home(tmp)
    model = write_tiny_model(tmp / "slow.gguf", TinySpec(n_embd=256, n_layer=4, n_ff=1024, n_ctx=8192))
    shim = tmp / "llama-server"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'support' / 'llama_server.py'} \"$@\"\n")
    shim.chmod(0o755)
    (home / "instances.toml").write_text(
        f'[[instance]]\nname = "llama-0"\nmodel = "{model}"\nalias = "{MODELS[0]}"\nslots = 2\n'
        f'reserved_slots = 0\nctx = 8192\nport = 0\n\n'
        f'[[instance]]\nname = "llama-1"\nmodel = "{model}"\nalias = "{MODELS[1]}"\nslots = 2\n'
        f'reserved_slots = 0\nctx = 8192\nport = 0\nengine = "external"\nserver_bin = "{shim}"\n')
    env = appliance_env(home, DRAIN_GRACE_S="15", RATE_LIMITS="tasks:write=10000/s:10000,tasks:read=10000/s:10000")
    return home, env


class Chaos:
    def __init__(self, home: Path, env: dict):
        self.home, self.env = home, env
        self.app = Appliance(home, env)
        self.history = History()
        self.rows: list[dict] = []
        self.load: Load | None = None
        self.probes: list[str] = []  # the API's answers while the broker was away

    def start(self) -> None:
        self.app = Appliance(self.home, self.env)
        self.app.start()
        self.app.wait_ready(120)
        wait_until(lambda: len(self.app.get("/v1/async/stats").json()["workers"]) == 2, 60, 0.2,
                   "both instances registered")

    def pid(self, program: str) -> int:
        out = self.app.ctl("pid", program).stdout.strip()
        return int(out) if out.isdigit() else 0

    def children(self, pid: int) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def stats(self) -> dict:
        return self.app.get("/v1/async/stats").json()

    def status(self, task_id: str, busy_ok: bool = False) -> dict | None:
        """The task's status; never unknown (never lost). `busy_ok`: None for a 503
        broker_unavailable, the API's honest answer while the broker, catching up after a
        fault on these 2 cores, takes over BROKER_TIMEOUT_S to answer (seen once in a
        clean-clone run, after a launcher's SIGSTOP); settling asks again."""
        r = self.app.get(f"/v1/async/status/{task_id}")
        if busy_ok and r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable":
            return None
        assert r.status_code == 200, (task_id, r.status_code, r.text)  # never unknown: never lost
        return r.json()

    def settle(self, phase: str) -> tuple[int, list[str]]:
        """Every task accepted in `phase` is final within SETTLE_S: (count, the re-run ones)."""
        ids = self.history.in_phase(phase)
        pending = set(ids)

        def done():
            try:
                for task_id in list(pending):
                    if (self.status(task_id, busy_ok=True) or {}).get("state") in FINAL:
                        pending.discard(task_id)
            except requests.ConnectionError:
                return False  # the API itself is coming back (a killed master): ask again
            return not pending
        wait_until(done, SETTLE_S, 0.5, f"{len(pending)} accepted tasks of '{phase}' final")
        reruns = []
        for task_id in ids:
            st = self.status(task_id)
            assert st["state"] == "completed", (task_id, st["state"], st.get("error"), st.get("attempts"), phase)
            if st.get("attempts", 0) > 1:
                reruns.append(task_id)
        return len(ids), reruns

    def fault(self, name: str, inject, back=None, streams=()) -> dict:
        """Run one fault under load and check it; `back()` returns seconds until the hurt
        process is back (None: nothing was restarted)."""
        st = self.stats()
        self.history.phase = name
        for s in streams:  # the streamed tasks belong to the fault they are exposed to
            self.history.accepted[s.task_id] = name
        in_flight = st["queued"] + st["running"]
        t0 = time.monotonic()
        inject()
        back_s = back(t0) if back else None
        wait_until(lambda: self.history.first_accept_after(t0 + (back_s or 0)), 30, 0.05, "submits accepted again")
        ok_again = self.history.first_accept_after(t0) - t0
        ends = [s.ended(30) for s in streams]
        time.sleep(1.0)  # some load after the recovery too
        self.history.phase = f"after {name}"
        accepted, reruns = self.settle(name)
        explained = [t for t in reruns if self.status(t)["attempts"] == 2]
        assert explained == reruns, "a re-run task must say so with attempts: 2"
        row = {"fault": name, "in flight": in_flight, "accepted": accepted, "lost": 0, "re-run": len(reruns),
               "back in s": None if back_s is None else round(back_s, 2), "202 again s": round(ok_again, 2),
               "API while away": ", ".join(self.probes) or "-", "streams": ", ".join(ends) or "-"}
        self.probes = []
        self.rows.append(row)
        return row


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    home, env = chaos_home(tmp_path_factory.mktemp("chaos"))
    c = Chaos(home, env)
    try:
        c.start()
        c.load = Load(c.app.url, c.app.auth(), c.history).start()
        time.sleep(1.0)
        yield c
    except BaseException:
        print(c.app.logs())
        raise
    finally:
        if c.load:
            c.load.stop()
        c.app.stop()
        report(c.rows)


def report(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if os.environ.get("CHAOS_REPORT"):
        Path(os.environ["CHAOS_REPORT"]).write_text(text + "\n")


def new_pid(chaos: Chaos, program: str, old: int):
    def back(t0: float) -> float:
        wait_until(lambda: chaos.pid(program) not in (0, old), 30, 0.05, f"{program} restarted")
        return time.monotonic() - t0
    return back


# The API gives up on the broker after BROKER_TIMEOUT_S (the default, 5 s). Here two
# llama.cpp servers keep both cores busy, so the bound asserted is only "never hangs";
# the time measured goes in the report. (At 1 s, the default before, this test met 503s
# where none belonged: a 2.5 s journal commit at start cut a stream's first query.)
BROKER_TIMEOUT_S = 5.0
ANSWER_BOUND_S = BROKER_TIMEOUT_S + 2.0


def probe_while_away(chaos: Chaos) -> float:
    """While the broker is away the API answers 503 broker_unavailable with Retry-After
    (or 202 if the broker was back already); never a hang. Returns the seconds it took."""
    t0 = time.monotonic()
    r = requests.post(chaos.app.url + "/v1/async/submit", json=FAST, headers=chaos.app.auth(), timeout=10)
    took = time.monotonic() - t0
    assert took < ANSWER_BOUND_S, took
    assert r.status_code == 202 or (r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
                                    and r.headers["Retry-After"]), (r.status_code, r.text)
    if r.status_code == 202:
        chaos.history.ok(r.json()["task_id"])
    chaos.probes.append(f"{r.status_code} in {took:.2f}s")
    return took


# ------------------------------------------------------------------ the faults, in turn
def test_sigkill_broker(chaos):
    streams = [Stream(chaos.app, "async", MODELS[0], chaos.history),
               Stream(chaos.app, "openai", MODELS[1], chaos.history)]
    wait_until(lambda: all(s.running() for s in streams), 30, 0.05, "streams running")
    old = chaos.pid("broker")
    probe = threading.Thread(target=probe_while_away, args=(chaos,))  # its answer may take BROKER_TIMEOUT_S

    def inject():
        os.kill(old, signal.SIGKILL)
        probe.start()

    def back(t0: float) -> float:
        took = new_pid(chaos, "broker", old)(t0)
        probe.join(ANSWER_BOUND_S)  # in the row, not in the restart time
        return took
    row = chaos.fault("SIGKILL broker", inject, back, streams)
    assert row["API while away"] != "-", "the probe while the broker was away did not answer"
    assert row["back in s"] < RESTART_S
    for s in streams:  # the broker went away under them: each ended saying so
        assert s.end.startswith("error:") or s.end in ("result", "done"), s.end
    assert chaos.status(streams[0].task_id)["state"] in FINAL | {"running", "queued"}


def test_sigkill_one_gunicorn_worker(chaos):
    master = chaos.pid("api")
    workers = sorted(chaos.children(master))
    assert len(workers) == 2

    def back(t0):
        wait_until(lambda: len(chaos.children(master) - set(workers)) == 1, 30, 0.05, "a new gunicorn worker")
        return time.monotonic() - t0
    row = chaos.fault("SIGKILL gunicorn worker", lambda: os.kill(workers[0], signal.SIGKILL), back)
    assert row["back in s"] < RESTART_S


def test_sigkill_gunicorn_master(chaos):
    old = chaos.pid("api")
    row = chaos.fault("SIGKILL gunicorn master", lambda: os.kill(old, signal.SIGKILL), new_pid(chaos, "api", old))
    assert row["back in s"] < RESTART_S
    wait_until(lambda: chaos.app.get("/healthz").status_code == 200, 30, 0.1, "the API back")


def test_sigkill_embedded_launcher(chaos):
    """llama-0 holds llama.cpp in its own process: the task running there is lost with it
    and runs again (attempts: 2); its stream says `task_restarted`."""
    stream = Stream(chaos.app, "async", MODELS[0], chaos.history)
    wait_until(stream.running, 30, 0.05, "stream running")
    old = chaos.pid("llama:llama-0")
    row = chaos.fault("SIGKILL launcher (embedded llama.cpp)", lambda: os.kill(old, signal.SIGKILL),
                      new_pid(chaos, "llama:llama-0", old), [stream])
    assert row["back in s"] < RESTART_S
    assert stream.end == "error:task_restarted", stream.end
    wait_until(lambda: chaos.status(stream.task_id)["state"] in FINAL, SETTLE_S, 0.5, "the interrupted task final")
    st = chaos.status(stream.task_id)
    assert (st["state"], st["attempts"]) == ("completed", 2)


def test_sigkill_external_llama_server(chaos):
    """llama-1's llama.cpp is a process of its own: killed, its task fails over to a new
    run (attempts: 2) and the launcher restarts it (supervisord restarts the launcher)."""
    stream = Stream(chaos.app, "openai", MODELS[1], chaos.history)
    wait_until(stream.running, 30, 0.05, "stream running")
    launcher = chaos.pid("llama:llama-1")
    (llama,) = chaos.children(launcher)

    def back(t0):
        def new_llama():
            pid = chaos.pid("llama:llama-1")
            return pid not in (0, launcher) and chaos.children(pid)
        wait_until(new_llama, 30, 0.05, "a new llama-server")
        return time.monotonic() - t0
    row = chaos.fault("SIGKILL llama.cpp (external server)", lambda: os.kill(llama, signal.SIGKILL), back, [stream])
    assert row["back in s"] < RESTART_S
    assert stream.end == "error:task_restarted", stream.end


def test_sigstop_then_sigcont_launcher(chaos):
    """A launcher frozen for less than WORKER_LIVENESS_S is not dead: it keeps its tasks."""
    stream = Stream(chaos.app, "async", MODELS[0], chaos.history)
    wait_until(stream.running, 30, 0.05, "stream running")
    pid = chaos.pid("llama:llama-0")
    dropped = chaos.stats()["workers_dropped"]

    def inject():
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        os.kill(pid, signal.SIGCONT)
    row = chaos.fault("SIGSTOP 3 s + SIGCONT launcher", inject, None, [stream])
    assert row["re-run"] == 0 and chaos.stats()["workers_dropped"] == dropped
    assert stream.end == "result" and chaos.status(stream.task_id)["attempts"] == 1
    assert chaos.pid("llama:llama-0") == pid


def stalls(chaos: Chaos) -> float:
    """appliance_broker_loop_stalls_total, all phases."""
    text = chaos.app.get("/metrics").text
    return sum(float(n) for n in re.findall(r"^appliance_broker_loop_stalls_total\{[^}]*\} (\S+)$", text, re.M))


def test_sigstop_then_sigcont_broker(chaos):
    """A frozen broker: the API answers 503 broker_unavailable after BROKER_TIMEOUT_S
    meanwhile (the freeze outlasts it), and a submit it gave up on is dropped when the
    broker thaws (it never runs unseen). Under WORKER_LIVENESS_S: no instance is dropped."""
    pid = chaos.pid("broker")
    expired = chaos.stats()["submits_expired"]
    stalls_before = stalls(chaos)

    def inject():
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)
            probe_while_away(chaos)
            assert chaos.probes[-1].startswith("503"), chaos.probes[-1]
            time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
    row = chaos.fault("SIGSTOP ~6 s + SIGCONT broker", inject)
    assert row["re-run"] == 0 and chaos.pid("broker") == pid
    assert chaos.stats()["submits_expired"] > expired
    # the broker counts the stall (the seconds it was frozen, wherever SIGSTOP caught it) and says so
    assert stalls(chaos) > stalls_before
    assert "broker loop stalled" in (chaos.home / "var" / "log" / "broker.log").read_text()


def test_drain_on_appliance_down_then_a_fresh_start(chaos):
    """`appliance down` with work running and queued: new work gets 503 shutting_down
    with Retry-After, the running tasks finish (attempts: 1), the queued ones wait in the
    journal and complete after `appliance up`; then the whole history is checked."""
    batch = [{"type": "complete", "prompt": "the patient", "max_tokens": 300, "model": MODELS[i % 2]}
             for i in range(12)]
    r = chaos.app.post("/v1/async/submit-batch", json={"tasks": batch})
    assert r.status_code == 202
    ids = [t["task_id"] for t in r.json()["tasks"]]
    for task_id in ids:
        chaos.history.accepted[task_id] = "drain"
    wait_until(lambda: chaos.stats()["running"] >= 3, 10, 0.05, "batch running")
    chaos.history.phase = "drain"
    st = chaos.stats()
    in_flight = st["queued"] + st["running"]
    t0 = time.monotonic()
    down = subprocess.run([str(chaos.app.bin / "appliance"), "down"], cwd=chaos.home, env=chaos.env,
                          capture_output=True, text=True, timeout=120)
    down_s = time.monotonic() - t0
    assert down.returncode == 0, down.stderr
    chaos.app.proc.wait(60)
    chaos.load.stop()
    answers = {a for (phase, a), n in chaos.history.answers.items() if phase == "drain"}
    assert "503 shutting_down" in answers, answers
    assert not any(a.startswith("5") and a not in ("503 shutting_down", "503 broker_unavailable") for a in answers)
    leftover = chaos.app.pids()
    assert not leftover, leftover
    chaos.app.log.close()

    chaos.history.phase = "after restart"
    t1 = time.monotonic()
    chaos.start()
    chaos.load = Load(chaos.app.url, chaos.app.auth(), chaos.history).start()
    accepted, reruns = chaos.settle("drain")
    up_s = time.monotonic() - t1
    assert all(chaos.status(t)["state"] == "completed" and chaos.status(t)["attempts"] == 1 for t in ids)
    assert not reruns  # a drain runs nothing twice
    chaos.rows.append({"fault": "appliance down (drain) + up", "in flight": in_flight, "accepted": accepted,
                       "lost": 0, "re-run": 0, "back in s": round(up_s, 2), "202 again s": round(down_s + up_s, 2),
                       "API while away": "503 shutting_down", "streams": "-"})
    time.sleep(1.0)
    chaos.load.stop()
    chaos.load = None
    # The whole history: every submit ever answered 202 is final.
    phases = {p for p in chaos.history.accepted.values()}
    for phase in phases:
        chaos.settle(phase)
    total = len(chaos.history.accepted)
    print(f"\nchaos: {total} tasks acknowledged, {total} final, 0 lost; answers: "
          f"{dict(Counter(a for (_, a) in chaos.history.answers.elements()))}")
