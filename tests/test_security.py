"""Security parts on their own: start-up rules, token checks, rate-limit table, audit chain.

The end-to-end counterparts (through gunicorn, the broker and llama.cpp) are in
test_e2e_security.py.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import stat
import subprocess
import time

import falcon.testing
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.api.auth import Authenticator
from appliance.api.errors import ApiError
from appliance.api.ratelimit import RateLimiter
from appliance.config import parse_rate_limits
from appliance.audit import AuditLog, verify
from appliance.config import ConfigError, load_settings
from appliance.security import check_startup, init_env, mint_token

from conftest import BIN

SEED_JWT = "2kHYVBuiUlkS1RhkvDjb0vg2BW65C8ZO8tR2vEULxQaFAgoEpExkuQ3i3ClFjDJc"
SEED_DB_PASSWORD = "j8cpfCfnnHTUDXtl0gNxiJ7n9E6pGwlFNB8KKpUbEso"
GOOD = "k3J9-vQx7_Lr2mWp8ZtY4nHc6BfDs1GaEu0IoKj5"


def settings(tmp_path, **env):
    base = {"APPLIANCE_HOME": str(tmp_path), "JWT_SECRET_KEY": GOOD, "AUDIT_KEY": GOOD[::-1],
            "JWT_ISSUER": "appliance", "JWT_AUDIENCE": "appliance"}
    base.update(env)
    return load_settings(base)


# ------------------------------------------------------------------ start-up


@pytest.mark.parametrize("secret, why", [
    ("", "JWT_SECRET_KEY is not set"),
    ("short-secret", "JWT_SECRET_KEY is 12 bytes; at least 32"),
    (SEED_JWT, "JWT_SECRET_KEY is a published, known-compromised value"),
    (SEED_DB_PASSWORD, "JWT_SECRET_KEY is a published, known-compromised value"),
    ("ab" * 20, "JWT_SECRET_KEY has too little variety"),
])
def test_start_up_refuses_a_weak_secret(tmp_path, secret, why):
    s = settings(tmp_path, JWT_SECRET_KEY=secret)
    with pytest.raises(ConfigError) as exc:
        check_startup(s)
    assert why in str(exc.value.code) and "appliance init" in str(exc.value.code)
    if secret:
        assert secret not in str(exc.value.code)  # the message never echoes a secret


def test_start_up_refuses_a_missing_audit_key_and_bad_cors_and_rate_limits(tmp_path):
    with pytest.raises(ConfigError, match="AUDIT_KEY is not set"):
        check_startup(settings(tmp_path, AUDIT_KEY=""))
    with pytest.raises(ConfigError, match="wildcard"):
        check_startup(settings(tmp_path, CORS_ORIGINS="*"))
    with pytest.raises(ConfigError, match="not an origin"):
        check_startup(settings(tmp_path, CORS_ORIGINS="https://ehr.example.org/app"))
    with pytest.raises(ConfigError, match="RATE_LIMITS"):
        check_startup(settings(tmp_path, RATE_LIMITS="tasks:write=fast"))
    with pytest.raises(ConfigError, match="unknown scope"):
        check_startup(settings(tmp_path, RATE_LIMITS="tasks:delete=1/s:1"))
    assert check_startup(settings(tmp_path)) == []
    warned = check_startup(settings(tmp_path, BROKER_FRONT="tcp://0.0.0.0:5555", LLAMA_HOST="10.0.0.5"))
    assert any("BROKER_FRONT=tcp://0.0.0.0:5555" in w for w in warned) and any("LLAMA_HOST" in w for w in warned)
    assert check_startup(settings(tmp_path, BROKER_FRONT="tcp://127.0.0.1:5555")) == []


def test_insecure_dev_mode_starts_but_pins_loopback_and_warns(tmp_path):
    s = settings(tmp_path, JWT_SECRET_KEY="", AUDIT_KEY="", ALLOW_INSECURE_DEV="true", API_HOST="0.0.0.0")
    warnings = check_startup(s)
    assert s.api_host == "127.0.0.1"
    assert any("overridden to 127.0.0.1" in w for w in warnings)
    assert any("AUTHENTICATION IS OFF" in w for w in warnings)


def test_asymmetric_algorithms_need_a_matching_public_key(tmp_path):
    with pytest.raises(ConfigError, match="needs JWT_PUBLIC_KEY_FILE"):
        check_startup(settings(tmp_path, JWT_ALGORITHM="RS256"))
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="RSA public key"):
        check_startup(settings(tmp_path, JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY_FILE=str(ec_pem)))
    assert check_startup(settings(tmp_path, JWT_ALGORITHM="ES256", JWT_PUBLIC_KEY_FILE=str(ec_pem),
                                  JWT_SECRET_KEY="")) == []


def test_init_writes_private_secrets_and_keeps_them(tmp_path):
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path)}
    out = subprocess.run([str(BIN / "appliance"), "init"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dotenv = tmp_path / ".env"
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in dotenv.read_text().splitlines() if "=" in line)
    for key in ("JWT_SECRET_KEY", "AUDIT_KEY"):
        assert len(values[key]) >= 32 and values[key] not in out.stdout + out.stderr
    assert check_startup(load_settings({"APPLIANCE_HOME": str(tmp_path)})) == []
    # again: nothing changes (issued tokens stay valid)
    subprocess.run([str(BIN / "appliance"), "init"], env=env, check=True, capture_output=True, timeout=60)
    assert dict(line.split("=", 1) for line in dotenv.read_text().splitlines() if "=" in line) == values
    # `appliance config` hides the secrets too
    cfg = subprocess.run([str(BIN / "appliance"), "config"], env=env, capture_output=True, text=True, timeout=60)
    assert values["JWT_SECRET_KEY"] not in cfg.stdout and "JWT_SECRET_KEY=<set, hidden>" in cfg.stdout


def test_init_replaces_a_known_compromised_secret(tmp_path):
    (tmp_path / ".env").write_text(f"JWT_SECRET_KEY={SEED_JWT}\nMODEL_ALIAS=site-model\n")
    _, written = init_env(tmp_path)
    text = (tmp_path / ".env").read_text()
    assert SEED_JWT not in text and "MODEL_ALIAS=site-model" in text
    assert set(written) == {"JWT_SECRET_KEY", "AUDIT_KEY"}


def test_token_command_mints_what_the_api_accepts(tmp_path):
    init_env(tmp_path)
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path)}
    out = subprocess.run([str(BIN / "appliance"), "token", "--sub", "ward-7", "--scopes", "tasks:read,tasks:write",
                          "--ttl", "10m"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    p = Authenticator(load_settings({"APPLIANCE_HOME": str(tmp_path)})).authenticate("Bearer " + out.stdout.strip())
    assert p.subject == "ward-7" and p.tenant == "ward-7" and p.scopes == {"tasks:read", "tasks:write"}
    bad = subprocess.run([str(BIN / "appliance"), "token", "--sub", "x", "--scopes", "root"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown scope" in bad.stderr


# -------------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict, claims: dict, key: bytes | None) -> str:
    """A token PyJWT would refuse to make (alg none, HMAC keyed with a public key)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def _claims(**over):
    now = int(time.time())
    c = {"sub": "alice", "scope": "tasks:read", "iat": now, "exp": now + 600, "iss": "appliance",
         "aud": "appliance"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _rejects(auth: Authenticator, token: str, code: str, words: str) -> None:
    with pytest.raises(ApiError) as exc:
        auth.authenticate(f"Bearer {token}")
    assert exc.value.status_code == 401 and exc.value.code == code and words in exc.value.message
    assert "Bearer" in exc.value.headers["WWW-Authenticate"]


def test_hs256_token_checks(tmp_path):
    s = settings(tmp_path)
    auth = Authenticator(s)
    good = jwt.encode(_claims(), GOOD, algorithm="HS256")
    p = auth.authenticate(f"Bearer {good}")
    assert (p.subject, p.tenant, p.scopes, p.admin) == ("alice", "alice", {"tasks:read"}, False)
    assert auth.authenticate(f"Bearer {good}") is p  # cached
    _rejects(auth, jwt.encode(_claims(), "another-secret-" + GOOD, algorithm="HS256"), "invalid_token",
             "signature")
    _rejects(auth, good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"), "invalid_token", "")
    _rejects(auth, jwt.encode(_claims(exp=int(time.time()) - 3600), GOOD, algorithm="HS256"), "token_expired",
             "expired")
    _rejects(auth, _hand_made({"alg": "none", "typ": "JWT"}, _claims(), None), "invalid_token", "algorithm")
    _rejects(auth, jwt.encode(_claims(aud="someone-else"), GOOD, algorithm="HS256"), "invalid_token", "audience")
    _rejects(auth, jwt.encode(_claims(iss="evil"), GOOD, algorithm="HS256"), "invalid_token", "issuer")
    _rejects(auth, jwt.encode(_claims(exp=None), GOOD, algorithm="HS256"), "invalid_token", "`exp`")
    _rejects(auth, jwt.encode(_claims(sub=None), GOOD, algorithm="HS256"), "invalid_token", "`sub`")
    with pytest.raises(ApiError) as exc:
        auth.authenticate(None)
    assert exc.value.code == "unauthenticated"
    with pytest.raises(ApiError) as exc:
        auth.authenticate(f"Basic {good}")
    assert exc.value.code == "unauthenticated"


def test_expiry_is_checked_on_cached_tokens(tmp_path):
    auth = Authenticator(settings(tmp_path, JWT_LEEWAY_S="0"))
    token = jwt.encode(_claims(exp=int(time.time()) + 1), GOOD, algorithm="HS256")
    auth.authenticate(f"Bearer {token}")
    time.sleep(1.6)
    _rejects(auth, token, "token_expired", "expired")


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_asymmetric_tokens_and_algorithm_confusion(tmp_path, alg):
    private = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    s = settings(tmp_path, JWT_ALGORITHM=alg, JWT_PUBLIC_KEY_FILE=str(tmp_path / "pub.pem"))
    auth = Authenticator(s)
    priv_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    token = mint_token(s, "bob", ["rag:read"], 60, private_key=priv_pem)
    assert auth.authenticate(f"Bearer {token}").scopes == {"rag:read"}
    # the classic confusion: HS256 "signed" with the public key the server holds
    _rejects(auth, _hand_made({"alg": "HS256", "typ": "JWT"}, _claims(), pem), "invalid_token", "algorithm")
    _rejects(auth, jwt.encode(_claims(), GOOD, algorithm="HS256"), "invalid_token", "algorithm")


def test_tenant_claim_can_be_configured(tmp_path):
    s = settings(tmp_path, TENANT_CLAIM="org")
    auth = Authenticator(s)
    p = auth.authenticate("Bearer " + mint_token(s, "dr-who", ["tasks:read"], 60, tenant="st-marys"))
    assert (p.subject, p.tenant) == ("dr-who", "st-marys")
    _rejects(auth, jwt.encode(_claims(), GOOD, algorithm="HS256"), "invalid_token", "`org`")


# --------------------------------------------------------------- rate limits


def _take_many(path, n, out):
    limiter = RateLimiter(path, parse_rate_limits("tasks:write=1/h:700"))
    out.put(sum(1 for _ in range(n) if limiter.take("alice", "tasks:write") == 0.0))


def test_rate_limit_is_one_bucket_across_processes(tmp_path):
    path = tmp_path / "rl.bin"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_take_many, args=(path, 1000, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sum(out.get(timeout=5) for _ in procs) == 700  # the burst: no lost update, not 3 x 700


def test_token_bucket_refills_at_its_rate(tmp_path):
    limiter = RateLimiter(tmp_path / "rl.bin", parse_rate_limits("tasks:read=2/s:3"))
    t = 1000.0
    assert [limiter.take("a", "tasks:read", now=t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", "tasks:read", now=t) == pytest.approx(0.5)
    assert limiter.take("b", "tasks:read", now=t) == 0.0  # per subject
    assert limiter.take("a", "tasks:read", now=t + 0.5) == 0.0
    assert limiter.take("a", "admin", now=t) == 0.0  # no rule, no limit


def test_a_lock_held_by_a_dead_worker_is_taken_over(tmp_path):
    """A worker killed inside its critical section must not wedge the others."""
    import mmap

    from appliance._shm import SpinLock

    buf = mmap.mmap(-1, 64)
    lock = SpinLock(buf, 0)
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies holding it
        SpinLock(buf, 0).acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert lock.owner == pid
    t0 = time.monotonic()
    lock.acquire()
    assert lock.owner == os.getpid() and time.monotonic() - t0 < 1.0
    lock.release()
    assert lock.owner == 0


def test_full_table_evicts_the_least_recently_used(tmp_path):
    limiter = RateLimiter(tmp_path / "rl.bin", parse_rate_limits("tasks:read=1/h:1"))
    for i in range(20_000):  # more subjects than slots: still an answer for each, never an error
        assert limiter.take(f"s{i}", "tasks:read", now=float(i)) == 0.0


# ------------------------------------------------------------------- audit


def _append_many(path, key, n, tag):
    log = AuditLog(path, key)
    for i in range(n):
        log.append(subject=tag, route="/v1/async/submit", ids=[f"{i:032x}"], status=202, outcome="ok")


def test_audit_chain_stays_one_chain_with_concurrent_writers(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, "k" * 32, 1000, f"w{j}")) for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    n, problems = verify(path, "k" * 32)
    assert (n, problems[:3]) == (3000, [])
    seqs = [json.loads(line)["seq"] for line in path.read_text().splitlines()]
    assert seqs == list(range(1, 3001))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_audit_chain_survives_a_stale_head(tmp_path):
    """A writer that died between its line and the head update: the next one reads the log."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "k" * 32)
    log.append(subject="a", ids=[f"{i:032x}" for i in range(300)])  # a long line (a batch): > 4 KiB
    (tmp_path / "audit.jsonl.head").write_bytes(b"\0" * 48)  # as if never updated
    fresh = AuditLog(path, "k" * 32)
    assert fresh.append(subject="b")["seq"] == 2
    assert verify(path, "k" * 32) == (2, [])


def test_audit_verify_names_changed_removed_and_reordered_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    _append_many(path, "k" * 32, 10, "alice")
    lines = path.read_text().splitlines(keepends=True)
    assert verify(path, "k" * 32) == (10, [])

    changed = lines.copy()
    changed[3] = changed[3].replace('"status":202', '"status":200')
    path.write_text("".join(changed))
    assert verify(path, "k" * 32)[1] == ["line 4 (seq 4): content changed (hash does not match)"]

    path.write_text("".join(lines[:5] + lines[6:]))
    assert verify(path, "k" * 32)[1] == ["line 6 (seq 7): 1 record(s) removed before it"]

    path.write_text("".join(lines[:2] + [lines[3], lines[2]] + lines[4:]))
    problems = verify(path, "k" * 32)[1]
    assert any(p.startswith("line 4 (seq 3): out of order") for p in problems), problems

    path.write_text("".join(lines))
    assert len(verify(path, "another-key" * 3)[1]) == 10  # without the key, no line verifies

    # the CLI says the same and exits non-zero
    path.write_text("".join(changed))
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path), "AUDIT_KEY": "k" * 32, "AUDIT_LOG": str(path)}
    out = subprocess.run([str(BIN / "appliance"), "audit", "verify"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "line 4 (seq 4): content changed" in out.stdout


# ------------------------------------------- guard without the rest (falcon.testing)


def test_probes_are_loopback_or_token_and_cors_is_exact(tmp_path):
    from appliance.api.app import create_app

    s = settings(tmp_path, CORS_ORIGINS="https://ehr.example.org", BROKER_TIMEOUT_S="0.2")
    client = falcon.testing.TestClient(create_app(s))
    assert client.simulate_get("/healthz", remote_addr="10.1.2.3").status_code == 200
    far = client.simulate_get("/readyz", remote_addr="10.1.2.3")
    assert far.status_code == 401 and far.json["error"]["code"] == "unauthenticated"
    token = mint_token(s, "prometheus", ["gpu:read"], 60)
    # with a token it passes the guard (and finds no broker here: 503, not 401)
    assert client.simulate_get("/readyz", remote_addr="10.1.2.3",
                               headers={"Authorization": f"Bearer {token}"}).status_code == 503
    assert client.simulate_get("/readyz", remote_addr="127.0.0.1").status_code == 503
    ok = client.simulate_get("/healthz", headers={"Origin": "https://ehr.example.org"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    other = client.simulate_get("/healthz", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_the_guard_decides_on_the_routed_resource_not_the_path_spelling(tmp_path):
    from appliance.api.app import create_app

    s = settings(tmp_path, BROKER_TIMEOUT_S="0.2")
    client = falcon.testing.TestClient(create_app(s))
    for path in ("//v1/async/stats", "///v1/async/stats", "/v1//async/stats", "/v1/async/stats/",
                 "/%761/async/stats", "//readyz"):
        r = client.simulate_get(path, remote_addr="10.1.2.3")
        assert r.status_code == 401 and r.json["error"]["code"] == "unauthenticated", path

    class Undeclared:  # a resource someone forgot to declare: admin only
        def on_get(self, req, resp):
            resp.media = {"secret": True}
    app = create_app(s)
    app.add_route("/v1/forgotten", Undeclared())
    client = falcon.testing.TestClient(app)
    user = mint_token(s, "alice", ["tasks:read", "tasks:write", "rag:read", "rag:write", "gpu:read"], 60)
    r = client.simulate_get("/v1/forgotten", headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403 and r.json["error"]["details"]["required"] == "admin"
    admin = mint_token(s, "root", ["admin"], 60)
    assert client.simulate_get("/v1/forgotten", headers={"Authorization": f"Bearer {admin}"}).json == {"secret": True}
