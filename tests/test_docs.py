"""Every command in the operator documents is checked (issue #14).

docs/QUICK_REFERENCE.md and docs/DEPLOYMENT.md: each line of their ```bash, ```sh,
```shell and ```console blocks (console: the `$ ` lines) is split into simple commands
(`&&`, `||`, `;`, `|`, `$(...)`, line continuations, comments, redirections, leading
VAR=value assignments, `sudo -u USER`, `env`). Then:
- `appliance ...` (also `.venv/bin/appliance`, `/opt/appliance/.venv/bin/appliance`)
  must parse with the CLI's own parser (appliance.cli.build_parser: no side effects);
  the side-effect-free ones (init, token, config, tiny-model, gpu record) also run for
  real in a temporary home;
- other programs must be in ALLOWED, with cheap checks where there are any: `make`
  targets exist in the Makefile, `curl` flags exist in this curl and its URLs name a
  route of the OpenAPI document with that method, `supervisorctl` subcommands and
  program names, `systemctl`/`journalctl` subcommands and units, `promtool` and `nginx`
  subcommands and flags, `nvidia-smi` flags, `cmake`/`git` forms;
- repository files named (docs/..., systemd/..., relative or under /opt/appliance/)
  must exist.
A program the checker does not know fails the test: the documents cannot drift silently.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "QUICK_REFERENCE.md", ROOT / "docs" / "DEPLOYMENT.md"]
LANGS = {"bash", "sh", "shell", "console"}
HOME = "/opt/appliance"

# Programs the documents may use, beyond those checked in detail below.
ALLOWED = {
    "cd", "export", "echo", "cat", "tail", "head", "grep", "less", "ls", "df", "du", "cp", "mv", "rm",
    "mkdir", "chmod", "chown", "chgrp", "install", "ln", "sed", "tee", "date", "reboot", "wget", "dpkg",
    "apt-get", "useradd", "usermod", "openssl", "certbot", "sqlite3", "systemd-analyze", "dmesg", "ss",
    "tar", "diff", "awk", "sort", "jq", "python3", "nvcc", "/usr/local/cuda/bin/nvcc", "llama-server",
    "/usr/local/bin/llama-server",
    # checked in detail
    "appliance", "make", "curl", "supervisorctl", "systemctl", "journalctl", "promtool", "nginx",
    "nvidia-smi", "cmake", "git",
}
UNITS = {"appliance", "appliance.service", "nginx", "prometheus", "prometheus-node-exporter", "grafana-server"}
SYSTEMCTL = {"start", "stop", "restart", "reload", "status", "enable", "disable", "daemon-reload", "is-active",
             "cat", "edit", "show"}
SUPERVISORCTL = {"status", "start", "stop", "restart", "tail", "pid", "avail", "maintail", "signal", "clear",
                 "version", "help", "reread", "update", "shutdown"}
PROGRAMS = {"broker", "api", "gpumon", "rag", "all", "llama:*"}
NVIDIA_SMI_FLAGS = {"-q", "-d", "-i", "-L", "-l", "--query-gpu", "--format", "--query-compute-apps"}
CMAKE_FLAGS = {"-S", "-B", "-G", "--build", "--target", "-j", "--config", "--install", "--parallel"}
OPS_ROUTES = {("/metrics", "get"), ("/openapi.json", "get")}
RUNNABLE = {"init", "token", "config", "tiny-model", "gpu"}


# ---------------------------------------------------------------- extraction

def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each command line of the shell blocks, continuations joined."""
    out: list[tuple[int, str]] = []
    lang, pending, start = None, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if lang is None:
                lang = fence.group(1).lower() or "text"
            else:
                assert not pending, f"{path.name}:{start}: a line continuation runs out of its block"
                lang = None
            continue
        if lang not in LANGS:
            continue
        if lang == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        elif lang == "console" and line.startswith("> "):
            line = line[2:]
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full and not full.startswith("#"):
            out.append((start, full))
    return out


def substitutions(line: str) -> tuple[str, list[str]]:
    """Replace each $(...) by a placeholder word; return the inner commands too."""
    inner: list[str] = []
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            assert depth == 0, f"unbalanced $( in {line!r}"
            body = line[i + 2:j - 1]
            rest, nested = substitutions(body)
            inner += [rest, *nested]
            out.append("SUBST")
            i = j
        else:
            out.append(line[i])
            i += 1
    return "".join(out), inner


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as word lists (assignments and redirections removed)."""
    assert "<<" not in line, f"here-documents are not checked: {line!r}"
    line, inner = substitutions(line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, words, skip_next = [], [], False
    for tok in lex:
        if skip_next:
            skip_next = False
            continue
        if tok and set(tok) <= set(";&|"):
            if words:
                commands.append(words)
            words = []
        elif tok and set(tok) <= set("<>&"):
            if words and words[-1].isdigit():
                words.pop()  # 2>...
            skip_next = True  # its target: a file, or the fd of >&1
        else:
            words.append(tok)
    if words:
        commands.append(words)
    for body in inner:
        commands += simple_commands(body)
    result = []
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # VAR=value before the command
        if words and words[0] == "sudo":
            words = words[1:]
            while words and words[0].startswith("-"):
                opt = words.pop(0)
                if opt in ("-u", "-g"):
                    words.pop(0)
        if words and words[0] == "env":
            words = words[1:]
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]
        if words:
            result.append(words)
    return result


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for n, line in code_lines(doc):
            for words in simple_commands(line):
                found.append((f"{doc.name}:{n}", words))
    return found


# ---------------------------------------------------------------- checks

def program(word: str) -> str:
    if word.endswith("/appliance") or word == "appliance":
        return "appliance"
    if word.endswith("/supervisorctl"):
        return "supervisorctl"
    return word


@lru_cache(maxsize=None)
def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


@lru_cache(maxsize=None)
def routes() -> set[tuple[str, str]]:
    from appliance.api.openapi import build
    from appliance.config import load_settings

    doc = build(load_settings())
    return {(path, method) for path, ops in doc["paths"].items() for method in ops} | OPS_ROUTES


@lru_cache(maxsize=None)
def curl_flags() -> set[str] | None:
    if not shutil.which("curl"):
        return None
    text = subprocess.run(["curl", "--help", "all"], capture_output=True, text=True).stdout
    return set(re.findall(r"(?:^|\s)(-[A-Za-z0-9#:]|--[a-z0-9-]+)", text))


def repo_paths(words: list[str]) -> list[str]:
    problems = []
    for w in words:
        rel = w[len(HOME) + 1:] if w.startswith(HOME + "/") else w
        if re.match(r"^(docs|systemd|loadtest)/", rel) and not (ROOT / rel).exists():
            problems.append(f"no such file in the repository: {rel}")
    return problems


def check_appliance(words: list[str]) -> list[str]:
    from appliance.cli import build_parser

    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exc:
        return [f"the appliance CLI refuses {' '.join(words[1:])!r} (exit {exc.code})"]
    return []


def check_curl(words: list[str]) -> list[str]:
    problems, flags = [], curl_flags()
    method, data, urls = None, False, []
    args = iter(words[1:])
    for w in args:
        if w.startswith("-") and len(w) > 1:
            if flags is not None:
                parts = [w.split("=")[0]] if w.startswith("--") else [f"-{c}" for c in w[1:]]
                problems += [f"curl has no flag {p}" for p in parts if p not in flags]
            if w in ("-X", "--request"):
                method = next(args).lower()
            elif w in ("-d", "--data", "--data-binary", "--json"):
                data = True
                next(args)
            elif w in ("-H", "--header", "-o", "--output", "-w", "--write-out", "-u", "--cacert", "--cert"):
                next(args)
        else:
            urls.append(w)
    if not urls:
        return problems + ["curl without a URL"]
    method = method or ("post" if data else "get")
    for url in urls:
        m = re.match(r"^(?:https?://)?[^/]+(/[^?#]*)", url)
        if not m:
            problems.append(f"curl URL without a path: {url}")
            continue
        path = m.group(1)
        ok = any(meth == method and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", route), path)
                 for route, meth in routes())
        if not ok:
            problems.append(f"no route {method.upper()} {path} in the OpenAPI document")
    return problems


def check(words: list[str]) -> list[str]:
    """Problems with one simple command; [] when it is fine."""
    prog = program(words[0])
    if prog not in ALLOWED:
        return [f"unknown program {words[0]!r}: add it to the checker (tests/test_docs.py) if it belongs"]
    problems = repo_paths(words)
    args = words[1:]
    if prog == "appliance":
        problems += check_appliance(words)
    elif prog == "make":
        for t in (a for a in args if "=" not in a and not a.startswith("-")):
            if t not in make_targets():
                problems.append(f"no make target {t!r}")
    elif prog == "curl":
        problems += check_curl(words)
    elif prog == "supervisorctl":
        if args[:2] != ["-c", "supervisord.conf"]:
            problems.append("supervisorctl without -c supervisord.conf")
        rest = args[2:]
        if not rest or rest[0] not in SUPERVISORCTL:
            problems.append(f"unknown supervisorctl command {rest[:1]}")
        for name in (w for w in rest[1:] if not w.startswith("-")):
            if name not in PROGRAMS and not re.fullmatch(r"llama:[a-z0-9-]+", name):
                problems.append(f"no supervisord program {name!r}")
    elif prog == "systemctl":
        sub = [a for a in args if not a.startswith("-")]
        if not sub or sub[0] not in SYSTEMCTL:
            problems.append(f"unknown systemctl command {sub[:1]}")
        problems += [f"unknown unit {u!r}" for u in sub[1:] if u not in UNITS]
    elif prog == "journalctl":
        for i, a in enumerate(args):
            if a == "-u" and args[i + 1] not in UNITS:
                problems.append(f"unknown unit {args[i + 1]!r}")
            if a.startswith("-") and a not in ("-u", "-n", "-f", "-e", "-b", "--since", "--no-pager"):
                problems.append(f"journalctl flag {a} not known to the checker")
    elif prog == "promtool":
        if args[:2] not in (["check", "config"], ["check", "rules"], ["test", "rules"]):
            problems.append(f"unknown promtool command {args[:2]}")
    elif prog == "nginx":
        problems += [f"nginx flag {a} not known" for a in args if a not in ("-t", "-T", "-s", "reload", "-v")]
    elif prog == "nvidia-smi":
        for a in args:
            if a.startswith("-") and a.split("=")[0] not in NVIDIA_SMI_FLAGS:
                problems.append(f"nvidia-smi flag {a} not known to the checker")
    elif prog == "cmake":
        for a in args:
            if a.startswith("-") and not a.startswith("-D") and a not in CMAKE_FLAGS:
                problems.append(f"cmake flag {a} not known to the checker")
    elif prog == "git":
        if not args or args[0] not in ("clone", "pull", "fetch", "checkout", "log", "describe", "status"):
            problems.append(f"git command {args[:1]} not known to the checker")
    return problems


# ---------------------------------------------------------------- tests

def test_the_documents_have_commands():
    for doc in DOCS:
        assert doc.is_file(), doc
        assert len(code_lines(doc)) >= 20, f"{doc.name}: too few commands found; has the block format changed?"


def test_every_command_is_known_and_accepted():
    problems = [f"{where}: {' '.join(words)}\n    {p}" for where, words in all_commands() for p in check(words)]
    assert not problems, "\n".join(problems)


def test_the_checker_refuses_what_it_should():
    assert check(["frobnicate", "--now"])
    assert check(["appliance", "stauts"])
    assert check(["appliance", "token", "--sub", "x"])  # --scopes is required
    assert check(["make", "deploy"])
    assert check(["curl", "-s", "localhost:8000/v1/nope"])
    assert check(["curl", "-s", "localhost:8000/v1/instances/llama-0/restart"])  # GET: the route is POST
    assert check(["supervisorctl", "-c", "supervisord.conf", "restart", "brokr"])
    assert check(["systemctl", "start", "apliance"])
    assert check(["cp", "docs/no-such-file.conf", "/etc/"])
    assert not check(["curl", "-s", "-X", "POST", "localhost:8000/v1/instances/llama-0/restart"])
    assert simple_commands('TOKEN=$(sudo -u appliance .venv/bin/appliance token --sub a --scopes admin) '
                           '&& curl -s localhost:8000/readyz > /dev/null 2>&1') == [
        ["curl", "-s", "localhost:8000/readyz"],
        [".venv/bin/appliance", "token", "--sub", "a", "--scopes", "admin"]]


def _run(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET_KEY", "AUDIT_KEY", "INSTANCES_FILE")}
    env["APPLIANCE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "appliance.cli", *argv], cwd=home, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_side_effect_free_commands_run(tmp_path):
    """init, token, config, tiny-model and gpu record, as the documents write them, in a
    temporary home (paths the documents name are moved into it)."""
    home = tmp_path / "home"
    home.mkdir()
    r = _run(["init"], home)
    assert r.returncode == 0 and (home / ".env").is_file(), r.stderr
    ran = set()
    for where, words in all_commands():
        if program(words[0]) != "appliance" or len(words) < 2 or words[1] not in RUNNABLE:
            continue
        argv = words[1:]
        if argv[0] == "tiny-model":
            argv = ["tiny-model", str(tmp_path / "tiny.gguf")]
        if argv[0] == "gpu":
            argv = [a if not a.endswith(".jsonl") else str(tmp_path / "gpu.jsonl") for a in argv]
            i = argv.index("--seconds")
            argv[i + 1] = "1"  # on a GPU box it records for real, briefly
        r = _run(argv, home)
        if argv[0] == "gpu" and r.returncode != 0:
            assert "NVML unavailable" in r.stderr, f"{where}: {r.stderr}"
        else:
            assert r.returncode == 0, f"{where}: appliance {' '.join(argv)}: {r.stderr}"
        if argv[0] == "token":
            assert r.stdout.count(".") == 2, f"{where}: not a JWT: {r.stdout!r}"
        ran.add(argv[0])
    assert {"init", "token", "config", "gpu"} <= ran, ran
