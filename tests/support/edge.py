"""nginx for the edge tests (tests/test_edge.py): the binary, a certificate, the
shipped docs/nginx.conf rendered for a throwaway prefix, and nginx running it.

Why a download: CI runs on a clean machine where nginx is not installed, and
installing Debian's package would also start its service on port 80. So, when
`nginx` is not on PATH, Debian's own package (and any library it needs that the
machine lacks) is fetched with `apt-get download` and unpacked with `dpkg -x` into
build/edge-tools/ (ignored by git): no service, no maintainer scripts. The second run
finds it there.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "docs" / "nginx.conf"
TOOLS = ROOT / "build" / "edge-tools"



@dataclass(frozen=True)
class Tool:
    binary: Path
    env: dict[str, str]  # LD_LIBRARY_PATH for libraries unpacked beside it

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)


def _sh(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _installed(package: str) -> bool:
    r = _sh(["dpkg-query", "-W", "-f=${Status}", package])
    return r.returncode == 0 and r.stdout.strip().endswith(" installed")


def _missing_dependencies(packages: list[str], skip: set[str]) -> list[str]:
    """Direct Depends of `packages` that this machine lacks (libssl3 on Debian 12 is
    libssl3t64 on 13: asking apt beats a fixed list)."""
    out = _sh(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
               "--no-replaces", "--no-enhances", *packages]).stdout
    names = set()
    for line in out.splitlines():
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*<?([^\s>]+)>?", line)
        if m:
            names.add(m.group(1).split(":")[0])
    return sorted(n for n in names - set(packages) - skip if not _installed(n))


def _download(packages: list[str], into: Path) -> None:
    r = _sh(["apt-get", "download", *packages], cwd=into)
    if r.returncode != 0:  # a fresh machine's package lists may be empty or stale
        upd = _sh(["apt-get", "update", "-qq"], timeout=600)
        r = _sh(["apt-get", "download", *packages], cwd=into)
        if r.returncode != 0:
            pytest.fail(f"`apt-get download {' '.join(packages)}` failed (after apt-get update, rc "
                        f"{upd.returncode}: {upd.stderr.strip()[-500:]}): {r.stderr.strip()[-1000:]}")


def debian_tool(name: str, packages: list[str], binary: str, version_arg: str = "--version",
                skip: set[str] = frozenset(), lib_subdirs: tuple[str, ...] = (),
                dependencies: bool = True) -> Tool:
    """`binary` (a path inside `packages`) from Debian's packages, unpacked with
    `dpkg -x` under build/edge-tools/NAME-root with whatever libraries they need that
    this machine lacks: no install, no maintainer scripts, no service started. Cached:
    the second call only checks a marker file. dependencies=False skips the packages'
    Depends: for a binary that needs only libc (Go) in a package whose Depends serve
    something else (prometheus: its web UI's JavaScript)."""
    root = TOOLS / f"{name}-root"
    arch_dirs = [d for triplet in ("x86_64-linux-gnu", "aarch64-linux-gnu")
                 for d in (f"usr/lib/{triplet}", f"lib/{triplet}", *(f"usr/lib/{triplet}/{s}" for s in lib_subdirs))]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([str(root / d) for d in arch_dirs] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    tool = Tool(root / binary.lstrip("/"), env)
    done = TOOLS / f"{name}.done"
    if done.exists() and tool.binary.exists():
        return tool
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.fail(f"{name} is not installed and cannot be fetched: the edge tests need `{Path(binary).name}` "
                    f"on PATH, or apt-get and dpkg to unpack Debian's {' '.join(packages)} (apt-get download + dpkg -x)")
    TOOLS.mkdir(parents=True, exist_ok=True)
    with open(TOOLS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest processes at once unpack it once
        if done.exists() and tool.binary.exists():
            return tool
        debs = TOOLS / f"{name}-debs"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        debs.mkdir()
        _download(packages, debs)
        extra = _missing_dependencies(packages, set(skip)) if dependencies else []
        if extra:
            _download(extra, debs)
        for deb in sorted(debs.glob("*.deb")):
            r = _sh(["dpkg", "-x", str(deb), str(root)])
            if r.returncode != 0:
                pytest.fail(f"dpkg -x {deb.name} failed: {r.stderr}")
        v = tool.run(version_arg)
        if v.returncode != 0:
            ldd = _sh(["ldd", str(tool.binary)], timeout=30).stdout
            pytest.fail(f"the unpacked {tool.binary.name} does not run ({v.stderr.strip()[-500:]}); its libraries:\n{ldd}")
        done.write_text(v.stdout + v.stderr)
    return tool


def on_path(command: str) -> Tool | None:
    found = shutil.which(command) or next((p for p in (f"/usr/sbin/{command}", f"/usr/bin/{command}")
                                           if os.access(p, os.X_OK)), None)
    return Tool(Path(found), dict(os.environ)) if found else None


def nginx() -> Tool:
    """The nginx on PATH, else Debian's `nginx` package unpacked (Debian 12: 1.22)."""
    return on_path("nginx") or debian_tool(
        "nginx", ["nginx", "nginx-common"], "/usr/sbin/nginx", version_arg="-v",
        skip={"iproute2", "debconf", "cdebconf", "debconf-2.0"})  # maintainer scripts' needs, not the binary's


def systemd_analyze() -> Tool:
    """systemd-analyze from PATH (Debian's `systemd` package, in this project's machine
    image), else that package and its private libsystemd-shared unpacked."""
    return on_path("systemd-analyze") or debian_tool(
        "systemd", ["systemd", "libsystemd-shared"], "/usr/bin/systemd-analyze", lib_subdirs=("systemd",),
        skip={"mount", "systemd-sysv", "libpam-systemd", "dbus", "default-dbus-system-bus", "dbus-system-bus"})


# ------------------------------------------------------------------ certificate
def self_signed(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate for 127.0.0.1 and localhost, its own trust anchor."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance edge test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)
            .add_extension(ski, False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


# ------------------------------------------------------------------ rendering
def _replace(text: str, old: str, new: str) -> str:
    """Replace every `old`; the shipped file must contain it (else the test renders nothing)."""
    assert old in text, f"docs/nginx.conf no longer contains {old!r}: update tests/support/edge.py"
    return text.replace(old, new)


def render_site(*, https_port: int, http_port: int, upstream: str, cert: Path, key: Path,
                monitoring: str = "192.0.2.0/24", allow_loopback: bool = True) -> str:
    """docs/nginx.conf with its placeholders filled and its ports and upstream moved, as
    an operator would (README "Behind nginx"). allow_loopback=False drops 127.0.0.1 from
    the /metrics allow list: every test request comes from 127.0.0.1."""
    text = CONF.read_text()
    for old, new in (("@SERVER_NAME@", "localhost 127.0.0.1"), ("@TLS_CERT@", str(cert)), ("@TLS_KEY@", str(key)),
                     ("@MONITORING_NET@", monitoring), ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
                     ("listen 80;", f"listen 127.0.0.1:{http_port};"), ("server 127.0.0.1:8000;", f"server {upstream};")):
        text = _replace(text, old, new)
    if not allow_loopback:
        text = _replace(text, "allow 127.0.0.1;", "")
    left = re.findall(r"@[A-Z_]+@", re.sub(r"#.*", "", text))
    assert not left, f"placeholders left unrendered: {left}"
    return text


def main_conf(prefix: Path, site: Path) -> str:
    """The main file around the site, as Debian's nginx.conf would include it, with every
    path nginx writes inside the prefix (its built-in ones are under /var/lib/nginx).
    As root, nginx's workers would drop to `nobody`, who cannot enter pytest's private
    tmp directories: they stay root here (no user directive is needed when not root)."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {prefix}/temp/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log info;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n    access_log {prefix}/logs/access.log;\n{temp}\n    include {site};\n}}\n")


def write_prefix(prefix: Path, site_text: str) -> Path:
    """A prefix with conf/nginx.conf (main) and conf/appliance.conf (the site); returns main."""
    for d in ("conf", "logs", "temp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    site = prefix / "conf" / "appliance.conf"
    site.write_text(site_text)
    main = prefix / "conf" / "nginx.conf"
    main.write_text(main_conf(prefix, site))
    return main


def check(ngx: Tool, prefix: Path, main: Path) -> subprocess.CompletedProcess:
    return ngx.run("-t", "-p", f"{prefix}/", "-c", str(main))


@contextlib.contextmanager
def running(ngx: Tool, prefix: Path, main: Path, ports: tuple[int, ...], timeout: float = 10):
    """nginx in the foreground on `ports` until the block ends (then a graceful quit)."""
    log = open(prefix / "logs" / "nginx.out", "wb")
    proc = subprocess.Popen([str(ngx.binary), "-p", f"{prefix}/", "-c", str(main), "-g", "daemon off;"],
                            env=ngx.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited {proc.returncode}: {error_log(prefix)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not listen on {pending}: {error_log(prefix)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", pending[0])) == 0:
                    pending.pop(0)
                    continue
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def error_log(prefix: Path) -> str:
    parts = []
    for name in ("nginx.out", "error.log"):
        f = prefix / "logs" / name
        if f.exists():
            parts.append(f"== {name}\n{f.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)
