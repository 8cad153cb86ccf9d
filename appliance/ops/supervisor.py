"""supervisord as the appliance drives it: the `llama` programs generated from the
instances file, and supervisord's XML-RPC interface for reload, restart and state.

Why generated: an instance is one edit of the instances file and one command
(`appliance reload`); nobody edits supervisord.conf by hand for it. The programs go
into var/run/llama-programs.conf, which supervisord.conf includes, as one group
`llama`, so operators see `llama:llama-0`, `llama:llama-1`, ... as before.
"""
from __future__ import annotations

import json
import xmlrpc.client
from pathlib import Path

import msgspec
from supervisor.xmlrpc import SupervisorTransport

from ..config import Settings
from ..instances import Instance

GROUP = "llama"
PROGRAMS_FILE = "llama-programs.conf"   # supervisord.conf includes it
APPLIED_FILE = "instances.applied.json"  # what the running programs were started with


def _here(s: Settings) -> Path:
    """var/run beside supervisord.conf: where supervisord.conf puts its socket and looks
    for the generated programs, whatever RUN_DIR says."""
    return s.home / "var" / "run"


_PROGRAM = """[program:{name}]
command=python -m procs.llama {name}
priority=30
autorestart=true
startsecs=2
startretries=5
stopwaitsecs={stopwait}
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={log_dir}/{name}.log
stdout_logfile_maxbytes=10MB
"""


def programs_conf(instances: list[Instance], log_dir: str, grace_s: float = 30.0) -> str:
    """The llama group; a launcher gets its tasks' grace (DRAIN_GRACE_S) and 15 s more to stop."""
    stopwait = int(grace_s) + 15
    head = (f"; generated from the instances file by `appliance up` / `appliance reload`: do not edit\n"
            f"[group:{GROUP}]\nprograms={','.join(i.name for i in instances)}\npriority=30\n\n")
    return head + "\n".join(_PROGRAM.format(name=i.name, log_dir=log_dir, stopwait=stopwait) for i in instances)


def write_programs(s: Settings, instances: list[Instance]) -> Path:
    path = _here(s) / PROGRAMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(programs_conf(instances, str(Path(s.log_dir).resolve()), s.drain_grace_s))
    tmp.replace(path)
    return path


def applied(s: Settings) -> dict[str, dict]:
    """The instances (as resolved) the running programs were started with, by name."""
    try:
        return json.loads((_here(s) / APPLIED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _as_json(inst: Instance) -> dict:
    """An instance as the applied file holds it (tuples become lists), for comparison."""
    return json.loads(msgspec.json.encode(inst))


def record_applied(s: Settings, instances: list[Instance]) -> None:
    data = {i.name: _as_json(i) for i in instances}
    (_here(s) / APPLIED_FILE).write_text(json.dumps(data))


def rpc(s: Settings, timeout: float = 30.0) -> xmlrpc.client.ServerProxy:
    """supervisord's XML-RPC interface, over its unix socket in RUN_DIR."""
    sock = _here(s) / "supervisor.sock"
    transport = SupervisorTransport(None, None, serverurl=f"unix://{sock}")
    transport.timeout = timeout
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def process_states(s: Settings) -> dict[str, dict]:
    """supervisord's view of each `llama` process, by instance name."""
    return {p["name"]: p for p in rpc(s, timeout=5.0).supervisor.getAllProcessInfo() if p["group"] == GROUP}


def restart(s: Settings, name: str) -> dict:
    """Stop and start one instance through supervisord (never by killing PIDs)."""
    proxy = rpc(s)
    full = f"{GROUP}:{name}"
    info = proxy.supervisor.getProcessInfo(full)
    if info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
        proxy.supervisor.stopProcess(full, True)
    proxy.supervisor.startProcess(full, True)
    return proxy.supervisor.getProcessInfo(full)


def reload(s: Settings, instances: list[Instance]) -> dict[str, list[str]]:
    """Apply an edited instances file to the running appliance: new instances start,
    removed ones stop, changed ones restart; the others are not touched."""
    before = applied(s)
    write_programs(s, instances)
    proxy = rpc(s, timeout=120.0)
    proxy.supervisor.reloadConfig()
    now = {i.name: i for i in instances}
    gone = [name for name in before if name not in now]
    for name in gone:
        try:
            proxy.supervisor.stopProcess(f"{GROUP}:{name}", True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise
    report = proxy.appliance.updateGroup(GROUP)
    changed = [n for n, inst in now.items() if n in before and before[n] != _as_json(inst)]
    for name in changed:  # the launcher reads its instance at start: a restart applies the change
        restart(s, name)
    record_applied(s, instances)
    return {"added": report["added"], "removed": report["removed"], "restarted": changed,
            "unchanged": sorted(n for n in now if n in before and n not in changed)}
