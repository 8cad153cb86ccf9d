"""loadtest/soak.py: a short run against a real appliance must come out clean, and
the growth verdict must fail when a process grows past the bound.

The short run proves the script's plumbing (every kind of request, the process
discovery, the report) rather than the absence of leaks: that takes the 30-minute
run with the growth check on, which is too long for the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import running_appliance

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))
import soak  # noqa: E402

EXPECTED = {"broker", "gpumon", "api master", "api worker 1", "api worker 2", "llama-0", "rag"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_appliance(tmp_path_factory) as app:
        yield app


def test_short_soak_is_clean(app, tmp_path):
    out = tmp_path / "soak.json"
    token = app.mint("soak", "tasks:read", "tasks:write", "rag:read")
    run = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "soak.py"), "--url", app.url, "--home", str(app.home),
         "--mix", soak.DEFAULT_MIX + ",rag_search=1",
         "--seconds", "20", "--warmup", "5", "--clients", "3", "--sample-every", "5",
         "--no-growth-check", "--json", str(out)],
        env={**os.environ, "APPLIANCE_TOKEN": token}, capture_output=True, text=True, timeout=150)
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == []
    assert report["errors"] == {}
    assert report["tasks"]["lost"] == 0
    assert report["tasks"]["final"] == {"completed": report["tasks"]["accepted"]}
    for kind in soak.KINDS:
        counts = report["requests"][kind]
        assert counts["count"] >= 20, (kind, counts)
        assert counts["errors"] == 0 and counts["p50_ms"] > 0 and counts["p95_ms"] >= counts["p50_ms"], counts
    rows = {r["name"]: r for r in report["processes"]}
    assert EXPECTED <= set(rows), sorted(rows)
    for name in EXPECTED:
        r = rows[name]
        assert r["verdict"] == "PASS" and r["pid_baseline"] == r["pid_end"], r
        assert r["rss_mib_baseline"] > 1 and r["rss_mib_end"] > 1, r
        assert r["fds_baseline"] > 0 and r["fds_end"] > 0, r
    assert len(report["samples"]) >= 2
    # the table a user reads says the same
    assert "errors: none" in run.stdout and run.stdout.rstrip().endswith("PASS")


def _snap(rss_mib: float, fds: int, pid: int = 100) -> soak.Snapshot:
    snap = soak.Snapshot(at=0.0)
    snap.procs["broker"] = soak.Proc("broker", pid, start=1, rss_kib=int(rss_mib * 1024), fds=fds, threads=3)
    return snap


def test_growth_verdict():
    assert soak.growth_verdict(100, 110, 5) == (10.0, False)
    assert soak.growth_verdict(100, 105, 5) == (5.0, True)
    assert soak.growth_verdict(100, 90, 5) == (-10.0, True)
    assert soak.growth_verdict(20, 24, 5, slack=4)[1]  # within the descriptor slack
    assert not soak.growth_verdict(20, 25, 5, slack=4)[1]
    assert soak.growth_verdict(None, 10, 5) == (None, False)  # unreadable is not a pass


def test_ten_percent_growth_fails():
    start = base = _snap(100, 20)
    rows = soak.judge_processes(start, base, _snap(110, 20), max_growth_pct=5)
    assert [(r["name"], r["verdict"], r["rss_growth_pct"]) for r in rows] == [("broker", "FAIL", 10.0)]
    assert "RSS +10.0% > 5%" in rows[0]["why"]
    rows = soak.judge_processes(start, base, _snap(100, 22), max_growth_pct=5, fd_slack=0)
    assert rows[0]["verdict"] == "FAIL" and "FDs +10.0% > 5%" in rows[0]["why"]
    report = {"errors": {}, "tasks": {"lost": 0}, "requests": {"submit": {"count": 1}}, "processes": rows}
    assert soak.failures(report) == ["broker: FDs +10.0% > 5%"]
    # within the bound, or with the check off, it passes (and says what it saw)
    assert soak.judge_processes(start, base, _snap(104, 20), 5)[0]["verdict"] == "PASS"
    off = soak.judge_processes(start, base, _snap(110, 20), 5, growth_check=False)[0]
    assert off["verdict"] == "PASS" and "RSS +10.0%" in off["why"]


def test_restart_fails_whatever_the_growth():
    rows = soak.judge_processes(_snap(100, 20), _snap(100, 20), _snap(100, 20, pid=200), 5, growth_check=False)
    assert rows[0]["verdict"] == "FAIL" and "restarted (pid 100 -> 200)" in rows[0]["why"]
    gone = soak.Snapshot(at=0.0, not_running={"broker": "FATAL"})
    rows = soak.judge_processes(_snap(100, 20), _snap(100, 20), gone, 5)
    assert rows[0]["verdict"] == "FAIL" and "FATAL" in rows[0]["why"]


def test_the_mix_names_known_operations_only():
    assert soak.parse_mix("async_chat=1,rag_search=2") == {"async_chat": 1.0, "rag_search": 2.0}
    with pytest.raises(Exception, match="unknown"):
        soak.parse_mix("rag_serch=1")
