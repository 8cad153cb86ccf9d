"""The `appliance` command: what operators type.

`up` runs supervisord in the foreground with every process (Ctrl-C stops all),
`down` stops it, `status` lists the programs. The home directory (APPLIANCE_HOME,
default: the current directory) holds supervisord.conf, the optional .env, and var/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .config import ensure_dirs, load_settings


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


def cmd_up(args) -> None:
    s = load_settings()
    ensure_dirs(s)
    conf = _conf(s.home)
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


def cmd_status(args) -> None:
    _ctl("status")


def cmd_model(args) -> None:
    from .llama.tinymodel import write_tiny_model

    path = write_tiny_model(args.path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def cmd_config(args) -> None:
    import msgspec

    s = load_settings()
    for key, value in sorted(msgspec.to_builtins(s).items()):
        print(f"{key}={value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="appliance", description="Clinical LLM inference appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run every process under supervisord (foreground; Ctrl-C stops all)").set_defaults(
        fn=cmd_up)
    sub.add_parser("down", help="stop a running appliance").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="supervisorctl status of every program").set_defaults(fn=cmd_status)
    sub.add_parser("config", help="print the effective settings").set_defaults(fn=cmd_config)
    m = sub.add_parser("tiny-model", help="write the built-in random-weight GGUF to PATH")
    m.add_argument("path")
    m.set_defaults(fn=cmd_model)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
