"""The edge in front of the appliance: docs/nginx.conf and systemd/appliance.service.

The shipped nginx config is rendered as an operator would fill it in (tests/support/
edge.py), checked by `nginx -t`, and then run by a real nginx in front of a running
appliance: real HTTPS requests show the security headers, a task submitted and
collected, SSE events passed on as they are generated, 413 above MAX_BODY_BYTES, 429
past 100 requests/s, /metrics refused outside its allow list, and the HTTP redirect.
A small stand-in upstream shows what nginx sends the appliance (forwarded headers,
kept-alive HTTP/1.1) and that the config itself, not only the appliance's
X-Accel-Buffering header, keeps streams unbuffered.

nginx is Debian's package unpacked without installing it (CI machines do not have
it, and installing it starts a service on port 80). The unit file is checked by
systemd-analyze itself (`verify`, and `security --offline` for its exposure score),
on a copy whose /opt/appliance paths point at a temporary home.
"""
from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from appliance.config import Settings
from appliance.llama.server import free_port
from conftest import ROOT, running_appliance, wait_until
from support import edge

SECURITY_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options",
                    "Content-Security-Policy", "Referrer-Policy")
STREAM_ROUTE = re.compile(r"location ~ (\S+) \{(.*?)\n    \}", re.S)


@dataclass
class Front:
    """One nginx running the rendered config: its HTTPS and plain-HTTP base URLs."""

    https: str
    http: str
    prefix: Path
    cert: Path

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.https + path, verify=str(self.cert), timeout=10, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.https + path, verify=str(self.cert), timeout=10, **kw)

    def error_log(self) -> str:
        return edge.error_log(self.prefix)


@contextlib.contextmanager
def serving(ngx: edge.Tool, tls: tuple[Path, Path], prefix: Path, upstream: str, **render):
    """nginx on free ports with docs/nginx.conf rendered for `upstream`; its logs are
    printed if the block fails."""
    cert, key = tls
    https_port, http_port = free_port(), free_port()
    main = edge.write_prefix(prefix, edge.render_site(https_port=https_port, http_port=http_port, upstream=upstream,
                                                      cert=cert, key=key, **render))
    checked = edge.check(ngx, prefix, main)
    assert checked.returncode == 0, checked.stderr
    with edge.running(ngx, prefix, main, (https_port, http_port)):
        front = Front(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", prefix, cert)
        try:
            yield front
        except BaseException:
            print(front.error_log())
            raise


@pytest.fixture(scope="module")
def ngx() -> edge.Tool:
    return edge.nginx()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[Path, Path]:
    return edge.self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_appliance(tmp_path_factory) as appliance:
        yield appliance


@pytest.fixture(scope="module")
def front(ngx, tls, app, tmp_path_factory):
    with serving(ngx, tls, tmp_path_factory.mktemp("nginx"), f"127.0.0.1:{app.port}") as f:
        yield f


def timed_sse(resp: requests.Response) -> list[tuple[float, str, str]]:
    """(seconds since the call, event, data) for each SSE event, stamped when the read
    that completed it returned: events that nginx held back arrive with one stamp."""
    t0, buf, out = time.monotonic(), b"", []
    for chunk in resp.iter_content(chunk_size=None):
        now = time.monotonic() - t0
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            kind, data = "message", None
            for line in block.decode().splitlines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
            if data is not None:  # `: keep-alive` comments carry none
                out.append((now, kind, data))
    return out


# ------------------------------------------------------------------ the file itself
def test_shipped_config_passes_nginx_t_once_filled_in_and_not_before(ngx, tls, tmp_path):
    """`nginx -t` accepts the rendered file without a warning, and refuses the file as
    shipped, naming a placeholder: an operator cannot load it half filled in."""
    cert, key = tls
    main = edge.write_prefix(tmp_path / "ok", edge.render_site(https_port=free_port(), http_port=free_port(),
                                                               upstream="127.0.0.1:8000", cert=cert, key=key))
    ok = edge.check(ngx, tmp_path / "ok", main)
    assert ok.returncode == 0 and "test is successful" in ok.stderr, ok.stderr
    # nginx >= 1.25.1 warns that `listen ... http2` is deprecated; 1.22 (Debian 12) has no `http2 on`
    warnings = [w for w in ok.stderr.splitlines() if "[warn]" in w and "http2" not in w]
    assert not warnings

    raw = edge.write_prefix(tmp_path / "raw", edge.CONF.read_text())
    refused = edge.check(ngx, tmp_path / "raw", raw)
    assert refused.returncode != 0 and re.search(r"@[A-Z_]+@", refused.stderr), refused.stderr


def test_stream_location_covers_the_streaming_routes_with_long_timeouts():
    """The one regex location that streams must match every SSE route and nothing else,
    unbuffered and with read timeouts past TASK_TIMEOUT_MAX_S; the body limit must be
    MAX_BODY_BYTES."""
    text = edge.CONF.read_text()
    (pattern, body), = [(p, b) for p, b in STREAM_ROUTE.findall(text) if "stream" in p]
    route = re.compile(pattern)
    for path in ("/v1/async/stream/0123abcd", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert route.search(path), path
    for path in ("/v1/async/submit", "/v1/async/stream/x/y", "/v1/async/result/x", "/healthz", "/metrics"):
        assert not route.search(path), path
    settings = Settings()
    assert "proxy_buffering off;" in body and "proxy_cache off;" in body
    for directive in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        seconds = int(re.search(rf"{directive} (\d+)s;", body).group(1))
        assert seconds > settings.task_timeout_max_s, directive
    assert re.search(r"client_max_body_size 1m;", text) and settings.max_body_bytes == 1024 * 1024
    assert str(settings.max_body_bytes) in text  # nginx's own 413 names the same limit


# ------------------------------------------------------------------ through nginx to the appliance
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_healthz_over_tls_with_security_headers(front, tls):
    """Security headers on answers and errors; TLS 1.2 with a forward-secret AEAD
    cipher; TLS 1.0 and 1.1 refused by the server's own alert."""
    r = front.get("/healthz")
    assert r.status_code == 200
    for name in SECURITY_HEADERS:
        assert name in r.headers, name
    assert int(re.search(r"max-age=(\d+)", r.headers["Strict-Transport-Security"]).group(1)) >= 31536000
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["Server"] == "nginx" and "Retry-After" not in r.headers  # no version; no stray header
    assert front.get("/no/such/route").headers.get("X-Frame-Options") == "DENY"  # errors carry them too

    host, port = front.https.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(tls[0]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        cipher, version, _ = s.cipher()
        assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher)
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):  # the client allows them: nginx says no
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(tls[0]))
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = old.maximum_version = version
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            with socket.create_connection((host, int(port)), timeout=5) as raw, \
                    old.wrap_socket(raw, server_hostname=host):
                pass


def test_submit_and_result_through_nginx(front, app):
    r = front.post("/v1/async/submit", headers=app.auth(),
                   json={"type": "complete", "prompt": "The patient", "max_tokens": 8})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]

    def done():
        res = front.get(f"/v1/async/result/{task_id}", headers=app.auth())
        return res if res.status_code == 200 else None
    result = wait_until(done, 30, 0.05, "result through nginx")
    assert result.json()["state"] == "completed" and result.json()["result"]["text"]
    assert front.get(f"/v1/async/status/{task_id}").status_code == 401  # the token is still the appliance's


def test_stream_events_arrive_as_they_are_generated(front, app):
    """GET /v1/async/stream/{id} through nginx: the first token event reaches the client
    well before the result event, and the text adds up to the result. The tiny model
    makes ~3,000 tokens/s here, so 64 tokens would be over in 20 ms, sooner than a
    stream opens: 1,000 take long enough (~0.4 s) to see them arrive as generated."""
    spec = {"type": "complete", "prompt": "The patient", "max_tokens": 1000, "temperature": 0.8, "seed": 7}
    task_id = front.post("/v1/async/submit", headers=app.auth(), json=spec).json()["task_id"]
    with requests.get(f"{front.https}/v1/async/stream/{task_id}", headers=app.auth(), stream=True,
                      verify=str(front.cert), timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert "X-Accel-Buffering" not in resp.headers  # nginx keeps its own control header
        events = timed_sse(resp)
    kinds = [k for _, k, _ in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "token" in kinds, kinds
    result = json.loads(events[-1][2])
    assert result["state"] == "completed"
    assert "".join(json.loads(d)["text"] for _, k, d in events if k == "token") == result["result"]["text"]
    first, last = next(t for t, k, _ in events if k == "token"), events[-1][0]
    # unbuffered: ~0.0 s and ~0.4 s here; buffered by nginx, both come in the same instant
    assert last - first > 0.1 and first < last / 2, f"first token {first:.3f} s, result {last:.3f} s: buffered?"


def test_body_over_max_body_bytes_is_413_at_nginx(front, app):
    """A body of exactly MAX_BODY_BYTES reaches the appliance (its 422: the prompt is
    too long); one byte more is refused by nginx, in the appliance's error model."""
    limit = Settings().max_body_bytes
    head = b'{"type": "complete", "prompt": "'
    exact = head + b"x" * (limit - len(head) - 2) + b'"}'
    headers = {**app.auth(), "Content-Type": "application/json"}
    at = front.post("/v1/async/submit", headers=headers, data=exact)
    assert len(exact) == limit and at.status_code == 422, at.text
    over = front.post("/v1/async/submit", headers=headers, data=exact + b" ")
    assert over.status_code == 413 and over.json()["error"]["code"] == "body_too_large"
    assert over.headers["X-Content-Type-Options"] == "nosniff"
    assert "client intended to send too large body" in front.error_log()


def test_plain_http_redirects_to_https(front):
    r = requests.get(front.http + "/v1/async/status/abc?x=1", allow_redirects=False, timeout=10)
    assert r.status_code in (301, 308)
    assert r.headers["Location"] == "https://127.0.0.1/v1/async/status/abc?x=1"


def test_metrics_only_for_its_allow_list(front, ngx, tls, app, tmp_path):
    """Every test request comes from 127.0.0.1, which the shipped allow list admits:
    a variant without it shows the deny, also for spellings nginx normalizes."""
    assert front.get("/metrics").status_code != 403  # passed on: the appliance answers
    with serving(ngx, tls, tmp_path / "closed", f"127.0.0.1:{app.port}", allow_loopback=False) as closed:
        for path in ("/metrics", "/metrics?x=1", "//metrics", "/%6detrics", "/./metrics"):
            r = closed.get(path)
            assert r.status_code == 403, path
            assert r.headers["Strict-Transport-Security"]
        assert closed.get("/healthz").status_code == 200
        assert "access forbidden by rule" in closed.error_log()


def test_rate_limit_per_client_address(ngx, tls, app, tmp_path):
    """100 requests/s with a burst of 200 from one address: a fast burst gets 429s with
    Retry-After from nginx, and no more than the burst plus the rate got through."""
    with serving(ngx, tls, tmp_path / "limited", f"127.0.0.1:{app.port}") as limited:
        local = threading.local()

        def one(_):
            if not hasattr(local, "session"):
                local.session = requests.Session()
            r = local.session.get(limited.https + "/healthz", verify=str(limited.cert), timeout=10)
            return r.status_code, r.headers.get("Retry-After"), r.text

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(400)))
        elapsed = time.monotonic() - t0
    passed = sum(1 for status, _, _ in answers if status == 200)
    refused = [(retry, body) for status, retry, body in answers if status == 429]
    assert passed + len(refused) == len(answers)
    assert refused, f"no 429 in {len(answers)} requests over {elapsed:.2f}s"
    assert passed <= 201 + 100 * elapsed + 5, (passed, elapsed)
    assert all(retry == "1" and json.loads(body)["error"]["code"] == "rate_limited" for retry, body in refused)


def test_appliance_down_is_a_json_502(ngx, tls, tmp_path):
    """With nothing listening upstream, clients get the appliance's error model, not
    nginx's HTML page."""
    with serving(ngx, tls, tmp_path / "down", f"127.0.0.1:{free_port()}") as down:
        r = down.get("/v1/async/stats")
    assert r.status_code == 502 and r.json()["error"]["code"] == "appliance_unavailable"
    assert r.headers["Content-Type"] == "application/json" and "Retry-After" not in r.headers


# ------------------------------------------------------------------ what nginx sends upstream
class _StandIn(BaseHTTPRequestHandler):
    """Echoes what reached it; the stream routes send 5 events 0.2 s apart, without
    the X-Accel-Buffering header the appliance sends (so only the config unbuffers)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/v1/async/stream/") or self.path == "/v1/chat/completions":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                data = f"event: token\ndata: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps({"version": self.request_version, "peer_port": self.client_address[1],
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_forwarded_headers_keepalive_and_unbuffered_streams(ngx, tls, stand_in, tmp_path):
    with serving(ngx, tls, tmp_path / "standin", stand_in) as f:
        a = f.get("/v1/async/stats", headers={"X-Forwarded-For": "203.0.113.9"}).json()
        b = f.get("/v1/async/stats").json()
        for seen in (a, b):
            assert seen["version"] == "HTTP/1.1"
            assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"  # the client's own value is not passed on
            assert seen["headers"]["x-forwarded-proto"] == "https"
            assert seen["headers"].get("connection", "").lower() != "close"
        assert a["peer_port"] == b["peer_port"], "nginx opened a new upstream connection: no keep-alive"

        for call in (lambda: requests.get(f.https + "/v1/async/stream/abc", stream=True, verify=str(f.cert), timeout=10),
                     lambda: requests.post(f.https + "/v1/chat/completions", json={"stream": True}, stream=True,
                                           verify=str(f.cert), timeout=10)):
            with call() as resp:
                events = timed_sse(resp)
            assert [d for _, _, d in events] == ["0", "1", "2", "3", "4"]
            assert events[-1][0] - events[0][0] > 0.6, f"events arrived at {[round(t, 3) for t, _, _ in events]}"


# ------------------------------------------------------------------ systemd unit
UNIT = ROOT / "systemd" / "appliance.service"


def unit_directives(text: str) -> dict[str, list[str]]:
    """Key -> values, in order, of a unit file (sections merged; enough for these checks)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value))


def test_unit_keeps_its_service_settings_and_hardening():
    d = unit_directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["User"] == "appliance" and one["Restart"] == "on-failure"
    assert one["ExecStart"].endswith("appliance up") and one["ExecStop"].endswith("appliance down")
    assert seconds(one["TimeoutStopSec"]) >= 90  # a stop drains for up to 45 s, then supervisord stops the rest
    for key, value in {"NoNewPrivileges": "true", "ProtectSystem": "strict", "PrivateTmp": "true",
                       "ProtectHome": "true", "ProtectKernelTunables": "true", "ProtectControlGroups": "true",
                       "RestrictSUIDSGID": "true", "LockPersonality": "true", "RestrictRealtime": "true",
                       "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "UMask": "0077"}.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}"
    assert one["ReadWritePaths"] == "/opt/appliance/var"
    assert set(one["RestrictAddressFamilies"].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    # both close the device policy: the GPU box's /dev/nvidia* would vanish
    assert "PrivateDevices" not in d and "ProtectClock" not in d and "DevicePolicy" not in d


def test_systemd_analyze_verifies_the_unit_and_rates_it(tmp_path):
    """systemd-analyze needs no running systemd for `verify` and `security --offline`;
    the copy's paths point at a home where ExecStart exists and is executable."""
    analyze = edge.systemd_analyze()
    home = tmp_path / "opt-appliance"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / "var").mkdir()
    exe = home / ".venv" / "bin" / "appliance"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT.read_text().replace("/opt/appliance", str(home)))

    verified = analyze.run("verify", str(unit))
    assert verified.returncode == 0 and "appliance.service" not in verified.stdout + verified.stderr, \
        verified.stdout + verified.stderr
    broken = tmp_path / "broken" / "appliance.service"  # the check can fail: a missing ExecStart is found
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace(str(exe), str(home / "missing")))
    assert analyze.run("verify", str(broken)).returncode != 0

    rated = analyze.run("security", "--offline=true", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", rated.stdout)
    assert m, rated.stdout + rated.stderr
    assert float(m.group(1)) <= 3.0, rated.stdout  # 8.5 before the hardening; 2.1 with it
