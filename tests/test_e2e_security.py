"""Security end to end: tokens, scopes, tenants, rate limits, audit and logs, through the
running appliance (gunicorn with two workers, broker, llama.cpp on the tiny model)."""
from __future__ import annotations

import json
import subprocess
import time

import jwt
import pytest
import requests

from conftest import BIN, Appliance, appliance_env, make_home, running_appliance, wait_until

SEED_JWT = "2kHYVBuiUlkS1RhkvDjb0vg2BW65C8ZO8tR2vEULxQaFAgoEpExkuQ3i3ClFjDJc"
PROMPT = "Patient Jane Roe, MRN 4471, reports chest pain radiating to the left arm."
CHAT = {"type": "chat", "max_tokens": 24, "messages": [{"role": "user", "content": PROMPT}]}
UNKNOWN = "0" * 32


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    env = {"RATE_LIMITS": "tasks:write=1/h:6,tasks:read=1000/s:2000", "MAX_PROMPT_CHARS": "2000",
           "MAX_BATCH": "4", "LOG_LEVEL": "DEBUG"}  # DEBUG: "no clinical text at any level"
    with running_appliance(tmp_path_factory, **env) as a:
        yield a


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def final(app: Appliance, task_id: str, token: str) -> dict:
    def done():
        r = app.get(f"/v1/async/result/{task_id}", headers=bearer(token))
        return r.json() if r.status_code == 200 else None
    return wait_until(done, 30, 0.05, f"task {task_id} to finish")


def error_of(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()["error"]["code"]


def test_every_v1_route_needs_a_token_and_the_probes_do_not(app):
    doc = app.get("/openapi.json", headers={"Authorization": None}).json()
    routes = [(m, p.replace("{task_id}", UNKNOWN)) for p, ops in doc["paths"].items() for m in ops
              if p.startswith("/v1/")]
    assert len(routes) >= 12
    variants = [("get", "/v1/no-such-route"), ("get", "//v1/async/stats"), ("post", "/v1//async/submit")]
    for method, path in routes + variants:
        r = requests.request(method, app.url + path, json={}, timeout=10)
        assert error_of(r, 401) == "unauthenticated", path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz", "/openapi.json"):  # /readyz: we are on loopback
        assert requests.get(app.url + path, timeout=10).status_code == 200


def test_bad_tokens_are_refused(app):
    s = app.settings()
    now = int(time.time())
    claims = {"sub": "mallory", "scope": "tasks:read tasks:write admin", "iat": now, "exp": now + 600,
              "iss": s.jwt_issuer, "aud": s.jwt_audience}
    forged = jwt.encode(claims, "not-the-secret-but-long-enough-0123456789", algorithm="HS256")
    expired = jwt.encode({**claims, "exp": now - 3600}, s.jwt_secret_key, algorithm="HS256")
    wrong_aud = jwt.encode({**claims, "aud": "another-service"}, s.jwt_secret_key, algorithm="HS256")
    alg_none = jwt.encode(claims, None, algorithm="none")
    for token, code in ((forged, "invalid_token"), (expired, "token_expired"), (wrong_aud, "invalid_token"),
                        (alg_none, "invalid_token"), ("not.a.jwt", "invalid_token")):
        r = app.post("/v1/async/submit", json=CHAT, headers=bearer(token))
        assert error_of(r, 401) == code, token


def test_a_missing_scope_is_403(app):
    reader = app.mint("reader-only", "tasks:read")
    writer = app.mint("writer-only", "tasks:write")
    r = app.post("/v1/async/submit", json=CHAT, headers=bearer(reader))
    assert error_of(r, 403) == "insufficient_scope" and r.json()["error"]["details"]["required"] == "tasks:write"
    assert error_of(app.get(f"/v1/async/status/{UNKNOWN}", headers=bearer(writer)), 403) == "insufficient_scope"
    assert error_of(app.get("/v1/models", headers=bearer(writer)), 403) == "insufficient_scope"
    rag = app.mint("rag-only", "rag:read", "rag:write", "gpu:read")
    assert error_of(app.post("/v1/chat/completions", headers=bearer(rag), json={
        "model": "x", "messages": [{"role": "user", "content": "hi"}]}), 403) == "insufficient_scope"


def test_tenants_cannot_see_or_touch_each_others_tasks(app):
    alice = app.mint("alice", "tasks:read", "tasks:write")
    bob = app.mint("bob", "tasks:read", "tasks:write")
    admin = app.mint("ops", "admin")
    r = app.post("/v1/async/submit", json=CHAT, headers={**bearer(alice), "Idempotency-Key": "visit-1"})
    assert r.status_code == 202
    task = r.json()["task_id"]
    unknown = {path: app.get(path.format(UNKNOWN), headers=bearer(bob)) for path in
               ("/v1/async/status/{}", "/v1/async/result/{}", "/v1/async/stream/{}")}
    for path, ref in unknown.items():
        theirs = app.get(path.format(task), headers=bearer(bob))
        # exactly the answer for an id that does not exist: nothing leaks
        assert (theirs.status_code, theirs.json()) == (ref.status_code, ref.json()) and ref.status_code == 404
    assert error_of(app.post(f"/v1/async/cancel/{task}", headers=bearer(bob)), 404) == "not_found"
    # the same idempotency key is bob's own: a task of his, not alice's
    theirs = app.post("/v1/async/submit", json=CHAT, headers={**bearer(bob), "Idempotency-Key": "visit-1"})
    assert theirs.status_code == 202 and theirs.json()["task_id"] != task
    # bob's cancel did nothing; alice and admin see the task
    assert final(app, task, alice)["state"] == "completed"
    status = app.get(f"/v1/async/status/{task}", headers=bearer(admin)).json()
    assert status["tenant"] == "alice" and status["state"] == "completed"
    final(app, theirs.json()["task_id"], bob)


def test_openai_calls_belong_to_the_caller(app):
    carol = app.mint("carol", "tasks:read", "tasks:write")
    model = app.get("/v1/models", headers=bearer(carol)).json()["data"][0]["id"]
    r = app.post("/v1/chat/completions", headers=bearer(carol),
                 json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200
    task = r.json()["id"].removeprefix("chatcmpl-")
    assert app.get(f"/v1/async/status/{task}", headers=bearer(carol)).status_code == 200
    assert app.get(f"/v1/async/status/{task}").status_code == 404  # tenant `tester`


def test_rate_limit_is_per_subject_and_shared_by_the_workers(app):
    token = app.mint("burst", "tasks:read", "tasks:write")
    codes = []
    for _ in range(10):  # a new connection each time: the kernel spreads them over both workers
        r = requests.post(app.url + "/v1/async/submit", json=CHAT, headers=bearer(token), timeout=10)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert codes == [202] * 6 + [429] * 4  # burst 6 in all, not 6 per worker
    other = app.mint("calm", "tasks:write")
    assert app.post("/v1/async/submit", json=CHAT, headers=bearer(other)).status_code == 202


def test_prompt_and_batch_limits(app):
    token = app.mint("limits", "tasks:write")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2001}]}
    r = app.post("/v1/async/submit", json=big, headers=bearer(token))
    assert error_of(r, 422) == "invalid_field" and r.json()["error"]["details"]["field"] == "messages[0].content"
    assert "MAX_PROMPT_CHARS" in r.json()["error"]["message"]
    r = app.post("/v1/async/submit-batch", json={"tasks": [CHAT] * 5}, headers=bearer(token))
    assert error_of(r, 422) == "invalid_field" and r.json()["error"]["details"]["field"] == "tasks"
    r = app.post("/v1/async/submit", data=b"{" + b" " * 2_000_000 + b"}", headers=bearer(token))
    assert error_of(r, 413) == "body_too_large"


def test_audit_log_records_who_did_what_and_verifies(app):
    dave = app.mint("dave", "tasks:read", "tasks:write")
    task = app.post("/v1/async/submit", json=CHAT, headers=bearer(dave)).json()["task_id"]
    final(app, task, dave)
    app.get(f"/v1/async/status/{task}", headers=bearer(app.mint("eve", "tasks:read")))
    requests.post(app.url + "/v1/async/submit", json=CHAT, timeout=10)
    path = app.home / "var" / "log" / "audit.jsonl"

    def records():
        return [json.loads(line) for line in path.read_text().splitlines()]
    recs = wait_until(lambda: (r := records()) and r[-1]["outcome"] == "unauthenticated" and r, 10)
    submit = next(r for r in recs if r["subject"] == "dave" and r["route"] == "/v1/async/submit")
    assert submit["ids"] == [task] and submit["status"] == 202 and submit["tenant"] == "dave"
    assert submit["remote"] == "127.0.0.1"
    peek = next(r for r in recs if r["subject"] == "eve")
    assert (peek["route"], peek["ids"], peek["status"], peek["outcome"]) == (
        "/v1/async/status/{task_id}", [task], 404, "not_found")
    assert recs[-1]["subject"] is None and recs[-1]["status"] == 401
    assert PROMPT not in path.read_text()
    out = subprocess.run([str(BIN / "appliance"), "audit", "verify"], env=app.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "chain intact" in out.stdout, out.stdout + out.stderr
    # someone edits the served log's copy: eve's 404 becomes a 200
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if '"subject":"eve"' in line)
    tampered = app.home / "tampered.jsonl"
    tampered.write_text("".join(lines[:at] + [lines[at].replace('"status":404', '"status":200')] + lines[at + 1:]))
    out = subprocess.run([str(BIN / "appliance"), "audit", "verify", "--file", str(tampered)], env=app.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"line {at + 1} " in out.stdout and "content changed" in out.stdout


def test_no_clinical_text_or_secret_in_any_log(app):
    """Runs last in this module: every log it wrote, audit log included, is clean."""
    r = app.post("/v1/async/submit", json=CHAT)
    generated = final(app, r.json()["task_id"], app.token)["result"]["text"]
    assert len(generated) > 10
    s = app.settings()
    logs = [p for p in (app.home / "var" / "log").iterdir() if p.is_file()] + [app.home / "appliance-up.out"]
    assert {"audit.jsonl", "api.log", "broker.log"} <= {p.name for p in logs}, logs
    var = app.home / "var"
    private = logs[:-1] + list((var / "data").glob("journal*")) + [var, var / "log", var / "data", var / "run"]
    for path in private:  # written under supervisord's umask 077: owner only
        assert path.stat().st_mode & 0o077 == 0, f"{path} is open to others"
    for path in logs:
        text = path.read_text(errors="replace")
        for needle in (PROMPT, "Jane Roe", "MRN 4471", generated, s.jwt_secret_key, s.audit_key, app.token):
            assert needle not in text, f"{needle[:20]!r}... found in {path.name}"


def test_llama_cpp_itself_wants_the_launchers_key(app):
    """No side door: a local process cannot use the model or read /slots (which shows prompts)."""
    endpoint = app.get("/v1/async/stats").json()["workers"][0]["endpoint"]
    keyfile = app.home / "var" / "run" / "llama-0.key"
    assert keyfile.stat().st_mode & 0o077 == 0
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (("get", "/slots", None), ("post", "/v1/chat/completions", chat)):
        assert requests.request(method, endpoint + path, json=body, timeout=10).status_code == 401, path
        wrong = requests.request(method, endpoint + path, json=body, timeout=10, headers=bearer("guess"))
        assert wrong.status_code == 401, path
        right = requests.request(method, endpoint + path, json=body, timeout=30,
                                 headers=bearer(keyfile.read_text().strip()))
        assert right.status_code == 200, path
    assert requests.get(endpoint + "/health", timeout=10).status_code == 200
    key = keyfile.read_text().strip()
    for path in app.home.glob("var/log/*"):
        assert key not in path.read_text(errors="replace"), path.name


def test_start_up_refuses_a_published_secret(tmp_path):
    home = make_home(tmp_path)
    env = appliance_env(home, JWT_SECRET_KEY=SEED_JWT)
    out = subprocess.run([str(BIN / "appliance"), "up"], cwd=home, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "JWT_SECRET_KEY is a published, known-compromised value" in out.stderr
    assert SEED_JWT not in out.stderr + out.stdout
    assert not (home / "var" / "run" / "supervisord.pid").exists()


def _listening(port: int) -> list[str]:
    addrs = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, p = local.split(":")
        if int(p, 16) == port and state == "0A":  # LISTEN
            addrs.append(".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return addrs


def test_insecure_dev_mode_and_opt_in_text_logging(tmp_path_factory):
    env = {"ALLOW_INSECURE_DEV": "true", "API_HOST": "0.0.0.0", "JWT_SECRET_KEY": "", "AUDIT_KEY": "",
           "LOG_CLINICAL_TEXT": "true"}
    with running_appliance(tmp_path_factory, **env) as dev:
        assert _listening(dev.port) == ["127.0.0.1"]
        r = requests.post(dev.url + "/v1/async/submit", json=CHAT, timeout=10)  # no token: auth is off
        assert r.status_code == 202
        generated = final(dev, r.json()["task_id"], "ignored")["result"]["text"]
        logs = dev.home / "var" / "log"
        api_log = (logs / "api.log").read_text()
        assert "ALLOW_INSECURE_DEV=true: AUTHENTICATION IS OFF" in api_log
        assert "overridden to 127.0.0.1" in api_log and "LOG_CLINICAL_TEXT=true" in api_log
        llama_log = wait_until(lambda: (t := (logs / "llama-0.log").read_text()) and PROMPT in t and t, 10)
        assert "LOG_CLINICAL_TEXT=true" in llama_log and generated[:20] in llama_log
