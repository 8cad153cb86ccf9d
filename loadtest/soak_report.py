"""The soak's verdicts and report. The verdicts are pure functions of snapshots and
counts, so that the tests can check them without a run: growth per process, restarts
and vanished processes, and every reason the run fails (its exit status).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from soak_load import KINDS
from soak_procs import Proc, Snapshot, proc_order

if TYPE_CHECKING:
    from soak_load import Load


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
                       key=proc_order):
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


def as_sample(snap: Snapshot, at0: float, phase: str) -> dict:
    """A snapshot as a point of the JSON report's time line."""
    return {"t_s": round(snap.at - at0, 1), "phase": phase,
            "procs": {n: {"pid": p.pid, "rss_kib": p.rss_kib, "fds": p.fds, "threads": p.threads}
                      for n, p in snap.procs.items()}}
