"""`appliance status`: one screen of what runs, for a person; `--json` for scripts.

It asks supervisord (XML-RPC) for the programs and the broker itself (its front
socket, as the API does) for the queue, the instances and the GPUs, so it still says
something useful when the API is down.
"""
from __future__ import annotations

import time
import xmlrpc.client

import msgspec

from ..config import Settings
from . import supervisor


def gather(s: Settings) -> dict:
    out: dict = {"programs": [], "broker": None, "gpu": None, "problems": []}
    try:
        infos = supervisor.rpc(s, timeout=5.0).supervisor.getAllProcessInfo()
        out["programs"] = [{"name": f"{p['group']}:{p['name']}" if p["group"] != p["name"] else p["name"],
                            "state": p["statename"], "pid": p["pid"] or None,
                            "uptime_s": (p["now"] - p["start"]) if p["statename"] == "RUNNING" else None}
                           for p in infos]
    except (OSError, xmlrpc.client.Error) as exc:
        out["problems"].append(f"supervisord not reachable: {exc}")
    from ..broker_client import BrokerClient, BrokerUnavailable

    client = BrokerClient(s.broker_front, 1.0)
    try:
        st = client.stats()
        out["broker"] = {"health": st.health, "health_reason": st.health_reason, "queued": st.queued,
                         "running": st.running, "depth": st.depth, "max_size": st.max_size,
                         "completed_per_min": st.completed_per_min, "dispatch_p95_ms": st.dispatch_p95_ms,
                         "workers": [msgspec.to_builtins(w) for w in st.workers]}
        g = client.gpu()
        t = g.telemetry  # an array-like message on the wire: spelled out for JSON
        out["gpu"] = {"source": t.source, "cpu_only": t.cpu_only, "reason": t.reason, "ts": t.ts,
                      "gpus": [msgspec.to_builtins(r) for r in t.gpus]} if t else None
        out["gpu_states"] = [msgspec.to_builtins(x) for x in g.states]
    except BrokerUnavailable as exc:
        out["problems"].append(f"broker not answering: {exc}")
    return out


def render(st: dict) -> str:
    lines = ["programs:"]
    for p in st["programs"]:
        up = f"up {p['uptime_s'] // 60:.0f} min" if p["uptime_s"] is not None else ""
        lines.append(f"  {p['name']:<16} {p['state']:<9} {('pid ' + str(p['pid'])) if p['pid'] else '':<10} {up}")
    b = st["broker"]
    if b:
        lines.append(f"queue: {b['health']}{' (' + b['health_reason'] + ')' if b['health_reason'] else ''}; "
                     f"{b['queued']} queued of {b['max_size']}, {b['running']} running, "
                     f"{b['completed_per_min']:.0f}/min, dispatch p95 {b['dispatch_p95_ms']:.1f} ms")
        lines.append("  by priority: " + ", ".join(f"{k} {v}" for k, v in b["depth"].items()))
        lines.append("instances:")
        for w in b["workers"]:
            gpu = f"GPU {w['gpu']}" if w["gpu"] >= 0 else "CPU"
            flags = [x for x in ("throttled: " + w["throttle_reason"] if w["throttled"] else "",
                                 "stopping" if w["stopping"] else "") if x]
            lines.append(f"  {w['name']:<12} {w['model']:<20} {w['running']}/{w['slots']} slots busy  {gpu}  "
                         f"starts {w['starts']}" + (f"  [{'; '.join(flags)}]" if flags else ""))
    g = st.get("gpu")
    if g is None and st["broker"]:
        lines.append("gpu: no telemetry from gpumon yet")
    if g is not None:
        if g["cpu_only"]:
            lines.append(f"gpu: none ({g['reason']})")
        for r in g.get("gpus", []):
            lines.append(f"gpu {r['index']}: {r['name']}  {r['temperature_c']:.0f} °C  "
                         f"{r['memory_used_mb']:.0f}/{r['memory_total_mb']:.0f} MiB  {r['utilization_pct']:.0f} %"
                         + (f"  {r['power_w']:.0f} W" if r.get("power_w") is not None else ""))
    for problem in st["problems"]:
        lines.append(f"! {problem}")
    lines.append(time.strftime("as of %Y-%m-%d %H:%M:%S"))
    return "\n".join(lines)

