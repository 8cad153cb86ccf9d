"""Secrets, tokens, and the start-up rules that keep a misconfigured appliance from serving.

Why refuse to start: an appliance that runs with a guessable secret is worse than one
that does not run, because it looks protected. ALLOW_INSECURE_DEV is the one explicit
way around the rules, and it pins the API to 127.0.0.1 so that it cannot be reached
from the network while it is insecure.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import time
import uuid
from pathlib import Path

from .config import SCOPES, ConfigError, Settings, dotenv_line

log = logging.getLogger("appliance.security")

MIN_SECRET_BYTES = 32

# Values that were published (the system description we replace shipped these two in
# its repository) or that people paste from examples. Compared case-insensitively.
KNOWN_COMPROMISED = frozenset(v.lower() for v in (
    "2kHYVBuiUlkS1RhkvDjb0vg2BW65C8ZO8tR2vEULxQaFAgoEpExkuQ3i3ClFjDJc",  # seed JWT secret
    "j8cpfCfnnHTUDXtl0gNxiJ7n9E6pGwlFNB8KKpUbEso",  # seed database password
    "changeme", "change-me", "secret", "your-secret-key", "your-256-bit-secret",
    "please-change-this-secret-key-in-production", "supersecretkeythatisatleast32byteslong",
))

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def secret_weakness(value: str) -> str | None:
    """Why a secret is unfit, or None. Never includes the value itself."""
    if not value:
        return "is not set"
    if value.lower() in KNOWN_COMPROMISED:
        return "is a published, known-compromised value"
    if len(value.encode()) < MIN_SECRET_BYTES:
        return f"is {len(value.encode())} bytes; at least {MIN_SECRET_BYTES} are required"
    if len(set(value)) < 10:
        return "has too little variety to be random"
    return None


def _load_public_key(s: Settings):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not s.jwt_public_key_file:
        raise ConfigError(f"JWT_ALGORITHM={s.jwt_algorithm} needs JWT_PUBLIC_KEY_FILE (a PEM public key)")
    try:
        key = load_pem_public_key(Path(s.jwt_public_key_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY_FILE: cannot load a PEM public key from {s.jwt_public_key_file}: "
                          f"{exc.__class__.__name__}") from None
    if s.jwt_algorithm == "RS256" and not (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        raise ConfigError("JWT_PUBLIC_KEY_FILE: RS256 needs an RSA public key of at least 2048 bits")
    if s.jwt_algorithm == "ES256" and not (isinstance(key, ec.EllipticCurvePublicKey)
                                           and key.curve.name == "secp256r1"):
        raise ConfigError("JWT_PUBLIC_KEY_FILE: ES256 needs an EC public key on P-256")
    return key


def auth_disabled(s: Settings) -> bool:
    """Only in insecure dev mode with no HS256 secret at all: every caller is `dev`."""
    return s.allow_insecure_dev and s.jwt_algorithm == "HS256" and not s.jwt_secret_key


def verification_key(s: Settings):
    return s.jwt_secret_key if s.jwt_algorithm == "HS256" else _load_public_key(s)


def check_startup(s: Settings) -> list[str]:
    """Refuse unsafe settings (ConfigError), or return the warnings to log loudly.

    Mutates `s` in one case only: insecure dev mode forces API_HOST to 127.0.0.1.
    """
    warnings: list[str] = []
    if "*" in s.cors_origins:
        raise ConfigError("CORS_ORIGINS: list exact origins (https://host:port); a wildcard is not allowed")
    for origin in s.cors_origin_list:
        if not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(f"CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path)")
    problems = []
    if s.jwt_algorithm == "HS256":
        why = secret_weakness(s.jwt_secret_key)
        if why:
            problems.append(f"JWT_SECRET_KEY {why}")
    else:
        _load_public_key(s)  # a bad key file is refused even in dev mode
    why = secret_weakness(s.audit_key)
    if why:
        problems.append(f"AUDIT_KEY {why}")
    for key, endpoint in (("BROKER_FRONT", s.broker_front), ("BROKER_BACK", s.broker_back),
                          ("BROKER_EVENTS", s.broker_events), ("TELEMETRY_ENDPOINT", s.telemetry_endpoint)):
        host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0] if endpoint.startswith("tcp://") else None
        if host is not None and host not in ("127.0.0.1", "localhost", "[::1]"):
            warnings.append(f"{key}={endpoint}: ZeroMQ sockets carry clinical text unauthenticated and "
                            "unencrypted; keep them on loopback or ipc:// unless the network is private")
    if s.llama_host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"LLAMA_HOST={s.llama_host}: llama.cpp speaks plain HTTP (its key protects access, "
                        "not the traffic); keep it on loopback unless the network is private")
    if s.log_clinical_text:
        warnings.append("LOG_CLINICAL_TEXT=true: prompts and generated text WILL be written to the logs. "
                        "Logs then hold clinical text; protect and retain them accordingly.")
    if not s.allow_insecure_dev:
        if problems:
            raise ConfigError("; ".join(problems) + ". Run `appliance init` to generate secrets into .env "
                              "(or set ALLOW_INSECURE_DEV=true on a development machine).")
        return warnings
    if s.api_host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"ALLOW_INSECURE_DEV=true: API_HOST {s.api_host} overridden to 127.0.0.1")
    s.api_host = "127.0.0.1"
    state = "AUTHENTICATION IS OFF (no JWT_SECRET_KEY)" if auth_disabled(s) else "weak secrets are accepted"
    warnings.append(f"ALLOW_INSECURE_DEV=true: {state}; {'; '.join(problems) or 'secrets are fine'}. "
                    "NEVER run like this with clinical data.")
    return warnings


def log_warnings(warnings: list[str]) -> None:
    for w in warnings:
        log.warning("!!! %s", w)


def parse_ttl(text: str) -> int:
    m = _TTL.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"TTL {text!r}: expected a positive number with an optional unit s, m, h or d")
    return int(m.group(1)) * _TTL_UNIT[m.group(2)]


def mint_token(s: Settings, subject: str, scopes: list[str], ttl_s: int, tenant: str | None = None,
               private_key: bytes | None = None, now: float | None = None) -> str:
    import jwt

    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not subject:
        raise ValueError("the subject must not be empty")
    now = int(time.time() if now is None else now)
    claims: dict = {"sub": subject, "scope": " ".join(scopes), "iat": now, "exp": now + ttl_s,
                    "jti": uuid.uuid4().hex}
    if s.tenant_claim != "sub":
        claims[s.tenant_claim] = tenant or subject
    if s.jwt_issuer:
        claims["iss"] = s.jwt_issuer
    if s.jwt_audience:
        claims["aud"] = s.jwt_audience
    if s.jwt_algorithm == "HS256":
        if secret_weakness(s.jwt_secret_key) and not s.allow_insecure_dev:
            raise ConfigError(f"JWT_SECRET_KEY {secret_weakness(s.jwt_secret_key)}; run `appliance init`")
        if not s.jwt_secret_key:
            raise ConfigError("JWT_SECRET_KEY is not set: there is nothing to sign with")
        key = s.jwt_secret_key
    else:
        if private_key is None:
            raise ConfigError(f"JWT_ALGORITHM={s.jwt_algorithm}: pass the private key (--key PEM); the appliance "
                              "itself holds only the public key")
        key = private_key
    return jwt.encode(claims, key, algorithm=s.jwt_algorithm)


def init_env(home: Path, rotate: bool = False) -> tuple[Path, list[str]]:
    """Create or complete `home/.env` (mode 0600) with generated secrets; return what was written.

    An existing secret is kept unless `rotate` (rotating JWT_SECRET_KEY invalidates every
    token in circulation; rotating AUDIT_KEY starts a new chain that `audit verify` checks
    with the new key, so archive the old log first).
    """
    path = home / ".env"
    lines = path.read_text().splitlines() if path.exists() else []
    wanted = {"JWT_SECRET_KEY": lambda: secrets.token_urlsafe(48), "AUDIT_KEY": lambda: secrets.token_urlsafe(48)}

    def key_value(line: str) -> tuple[str, str]:
        try:
            return dotenv_line(line) or ("", "")
        except ValueError:  # a broken line is kept as it is; load_settings names it
            return "", ""

    # a secret that start-up would refuse is replaced: no token signed with it can be trusted
    drop = set(wanted) if rotate else {k for k, v in map(key_value, lines) if k in wanted and secret_weakness(v)}
    lines = [ln for ln in lines if key_value(ln)[0] not in drop]
    present = {key_value(ln)[0] for ln in lines}
    written: list[str] = []
    if not lines:
        lines = [f"# Written by `appliance init` on {time.strftime('%Y-%m-%d')}. It holds secrets: keep it "
                 "mode 0600, out of backups you do not control, and never commit it.",
                 "JWT_ISSUER=appliance", "JWT_AUDIENCE=appliance"]
        written += ["JWT_ISSUER", "JWT_AUDIENCE"]
    for key, make in wanted.items():
        if key not in present:
            lines.append(f"{key}={make()}")
            written.append(key)
    tmp = path.with_name(f".env.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path, written
