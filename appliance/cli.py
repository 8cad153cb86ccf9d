"""The `appliance` command: what operators type.

`init` writes .env with generated secrets, `up` runs supervisord in the foreground
with every process (Ctrl-C stops all), `down` stops it (draining), `status` shows what
runs (programs, queue, instances, GPUs), `verify` runs the production checks,
`token` mints a bearer token, `audit verify` checks the audit chain, `gpu record`
records real NVML readings for replay (NVML_SAMPLES), `rag load-icd10cm` indexes the
ICD-10-CM code set. The home
directory (APPLIANCE_HOME, default: the current directory) holds supervisord.conf,
.env, and var/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from . import metrics, security
from .config import SECRET_KEYS, ConfigError, ensure_dirs, home_dir, load_settings


def _conf(home: Path) -> Path:
    conf = home / "supervisord.conf"
    if not conf.is_file():
        sys.exit(f"appliance: no supervisord.conf in {home} (set APPLIANCE_HOME to the appliance's directory)")
    return conf


def _env_with_venv() -> dict[str, str]:
    """supervisord's programs run `python -m procs.X`: put this interpreter first on PATH."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _instances(s):
    """The instances file, checked (ConfigError names the key), with its files present."""
    from . import instances

    found = instances.load(s)
    instances.check_files(found)
    return found


def cmd_up(args) -> None:
    # var/ holds clinical data and metadata (journal, logs, audit log, keys, sockets):
    # owner only. supervisord applies its own `umask` setting only when it daemonizes.
    os.umask(0o077)
    s = load_settings()
    for warning in security.check_startup(s):  # refuse here, before any process starts
        print(f"appliance: WARNING: {warning}", file=sys.stderr, flush=True)
    ensure_dirs(s)
    conf = _conf(s.home)
    from .ops import supervisor

    found = _instances(s)
    supervisor.write_programs(s, found)
    supervisor.record_applied(s, found)
    for stale in Path(s.run_dir).glob("*.starts"):  # restart counts are per run of the appliance
        stale.unlink()
    metrics.empty(s.run_dir)  # so are the metrics' counters (appliance/metrics)
    print("appliance: instances: " + ", ".join(f"{i.name} ({i.alias}, {i.slots} slots, "
                                               f"{f'GPU {i.gpu}' if i.gpu >= 0 else 'CPU'})" for i in found),
          flush=True)
    env = _env_with_venv()
    env["APPLIANCE_HOME"] = str(s.home)
    print(f"appliance: starting supervisord ({conf}); API on http://{s.api_host}:{s.api_port}", flush=True)
    supervisord = _tool("supervisord")
    os.execve(supervisord, [supervisord, "-n", "-c", str(conf)], env)


def _ctl(*words: str) -> None:
    s = load_settings()
    conf = _conf(s.home)
    ctl = _tool("supervisorctl")
    os.execve(ctl, [ctl, "-c", str(conf), *words], _env_with_venv())


def cmd_down(args) -> None:
    _ctl("shutdown")


def cmd_reload(args) -> None:
    """Apply an edited instances file: new instances start, removed ones stop, changed
    ones restart, the others go on untouched."""
    import xmlrpc.client

    from .ops import supervisor

    s = load_settings()
    found = _instances(s)
    try:
        report = supervisor.reload(s, found)
    except (OSError, xmlrpc.client.Fault) as exc:
        sys.exit(f"appliance: reload failed (is the appliance running? `appliance status`): {exc}")
    for what in ("added", "removed", "restarted", "unchanged"):
        print(f"{what}: {', '.join(report[what]) or '-'}")


def cmd_status(args) -> None:
    import json

    from .ops import status

    st = status.gather(load_settings())
    print(json.dumps(st, indent=2) if args.json else status.render(st))
    if st["problems"]:
        sys.exit(1)


def cmd_verify(args) -> None:
    from .ops import verify

    s = load_settings()
    token = args.token or os.environ.get("APPLIANCE_TOKEN") or verify.default_token(s)
    checks = verify.run(s, token)
    print(verify.render(checks))
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; failed: {', '.join(failed)}"
                                                                         if failed else ""))
    if failed:
        sys.exit(1)


def cmd_model(args) -> None:
    from .llama.tinymodel import write_tiny_model

    path = write_tiny_model(args.path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def cmd_config(args) -> None:
    import msgspec

    s = load_settings()
    for key, value in sorted(msgspec.to_builtins(s).items()):
        if key in SECRET_KEYS:
            value = "<set, hidden>" if value else ""
        print(f"{key}={value}")


def cmd_init(args) -> None:
    path, written = security.init_env(home_dir(), rotate=args.rotate)
    if written:
        print(f"appliance: wrote {', '.join(written)} to {path} (mode 0600); values are not shown")
    else:
        print(f"appliance: {path} already holds its secrets (mode 0600); nothing changed")


def cmd_token(args) -> None:
    s = load_settings()
    scopes = [x for x in args.scopes.replace(",", " ").split() if x]
    try:
        ttl = security.parse_ttl(args.ttl)
        key = Path(args.key).read_bytes() if args.key else None
        token = security.mint_token(s, args.sub, scopes, ttl, tenant=args.tenant, private_key=key)
    except (ValueError, OSError) as exc:
        sys.exit(f"appliance: {exc}")
    print(token)


def cmd_audit_verify(args) -> None:
    from .audit import verify

    s = load_settings()
    path = Path(args.file or s.audit_log)
    if not s.audit_key:
        sys.exit("appliance: AUDIT_KEY is not set: the chain cannot be checked without the key it was written with")
    if not path.exists():
        sys.exit(f"appliance: no audit log at {path}")
    n, problems = verify(path, s.audit_key)
    for p in problems:
        print(p)
    if problems:
        sys.exit(f"appliance: audit log {path}: {len(problems)} problem(s) in {n} lines")
    print(f"appliance: audit log {path}: {n} records, chain intact")


def cmd_gpu_record(args) -> None:
    """Real NVML readings to a sample file that NVML_SAMPLES replays (appliance/gpu/record.py)."""
    from .gpu.record import RecordError, record_file

    def progress(n: int, t: float) -> None:  # a long recording says how far it got (stderr: the file is the data)
        if n == 1 or int(t) // 10 != int(t - args.interval) // 10:
            print(f"appliance: gpu record: {n} samples, {t:.0f} of {args.seconds:g} s", file=sys.stderr, flush=True)

    try:
        n, gpus = record_file(args.file, args.seconds, args.interval, progress=progress)
    except RecordError as exc:
        sys.exit(f"appliance: gpu record: {exc}")
    print(f"appliance: wrote {n} samples of {gpus} GPU(s) to {args.file}")


def cmd_rag_load_icd10cm(args) -> None:
    """ICD-10-CM as site-wide documents, through the broker (appliance/ops/rag_load.py)."""
    import json

    from .broker_client import BrokerRefused, BrokerUnavailable
    from .ops.rag_load import load_icd10cm

    try:
        summary = load_icd10cm(load_settings(), args.chapter, args.limit, not args.no_wait,
                               lambda line: print(f"appliance: rag: {line}", file=sys.stderr, flush=True))
    except BrokerUnavailable:
        sys.exit("appliance: rag: the broker does not answer; is the appliance up (`appliance status`)?")
    except BrokerRefused as exc:
        sys.exit(f"appliance: rag: refused: {exc}")
    print(json.dumps(summary))
    if summary["failed"]:
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag; parsing has no side effects (tests/test_docs.py uses it)."""
    parser = argparse.ArgumentParser(prog="appliance", description="Clinical LLM inference appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run every process under supervisord (foreground; Ctrl-C stops all)").set_defaults(
        fn=cmd_up)
    sub.add_parser("down", help="stop a running appliance").set_defaults(fn=cmd_down)
    sub.add_parser("reload", help="apply an edited instances file: add, remove or restart only the instances "
                                  "that changed").set_defaults(fn=cmd_reload)
    st = sub.add_parser("status", help="one screen of what runs: programs, queue, instances, GPUs")
    st.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    st.set_defaults(fn=cmd_status)
    v = sub.add_parser("verify", help="the production checks as real probes; exit 1 when one fails")
    v.add_argument("--token", help="a bearer token with tasks:read, tasks:write and gpu:read (default: "
                                   "APPLIANCE_TOKEN, else one minted from the HS256 secret in .env)")
    v.set_defaults(fn=cmd_verify)
    sub.add_parser("config", help="print the effective settings").set_defaults(fn=cmd_config)
    i = sub.add_parser("init", help="write .env with generated secrets (mode 0600); keeps existing good ones")
    i.add_argument("--rotate", action="store_true", help="replace the secrets (invalidates every issued token)")
    i.set_defaults(fn=cmd_init)
    t = sub.add_parser("token", help="mint a bearer token (printed on stdout)")
    t.add_argument("--sub", required=True, help="subject: the caller's name (a person or a service)")
    t.add_argument("--scopes", required=True, help=f"comma-separated, from: {', '.join(security.SCOPES)}")
    t.add_argument("--ttl", default="12h", help="lifetime: seconds, or with a unit s/m/h/d (default 12h)")
    t.add_argument("--tenant", help="tenant, when TENANT_CLAIM is not `sub` (default: the subject)")
    t.add_argument("--key", help="PEM private key, for RS256/ES256 (the appliance holds only the public key)")
    t.set_defaults(fn=cmd_token)
    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain; names each changed, removed or reordered line")
    v.add_argument("--file", help="the log to check (default: AUDIT_LOG)")
    v.set_defaults(fn=cmd_audit_verify)
    g = sub.add_parser("gpu", help="GPU tools")
    gsub = g.add_subparsers(dest="gpu_command", required=True)
    r = gsub.add_parser("record", help="record real NVML readings as JSON lines that NVML_SAMPLES replays")
    r.add_argument("--seconds", type=float, required=True, help="how long to record")
    r.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    r.add_argument("file", help="the sample file to write (JSON lines)")
    r.set_defaults(fn=cmd_gpu_record)
    rg = sub.add_parser("rag", help="retrieval tools")
    rsub = rg.add_subparsers(dest="rag_command", required=True)
    ld = rsub.add_parser("load-icd10cm", help="index ICD-10-CM codes (shipped in simple-icd-10-cm) as site-wide "
                                              "documents, through the running appliance's broker")
    ld.add_argument("--chapter", action="append", help="only this chapter (repeatable; default: all)")
    ld.add_argument("--limit", type=int, help="at most this many codes")
    ld.add_argument("--no-wait", action="store_true", help="return once submitted, not once indexed")
    ld.set_defaults(fn=cmd_rag_load_icd10cm)
    m = sub.add_parser("tiny-model", help="write the built-in random-weight GGUF to PATH")
    m.add_argument("path")
    m.set_defaults(fn=cmd_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        sys.exit(str(exc.code))


if __name__ == "__main__":
    main()
