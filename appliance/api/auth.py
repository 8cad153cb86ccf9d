"""Bearer-token authentication: who is calling, for which tenant, with which scopes.

Only the configured algorithm is accepted (HS256 with JWT_SECRET_KEY, or RS256/ES256
with a public key): a token that names another algorithm, `none` included, is refused
before any key is used, which is what closes algorithm confusion. `exp` and the
subject are required; `iss` and `aud` are checked when configured.

Verified tokens are cached by their full text (signature included, so a forged token
can never hit the cache), with expiry checked on every use: a client that polls with
the same token pays for one HMAC or signature check, not one per request.
"""
from __future__ import annotations

import time

import jwt
import msgspec

from ..config import Settings
from ..security import SCOPES, auth_disabled, verification_key
from .errors import ApiError

_CACHE_MAX = 10_000
_MAX_TOKEN = 8192


class Principal(msgspec.Struct, frozen=True):
    subject: str
    tenant: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.admin


DEV_PRINCIPAL = Principal("dev", "dev", frozenset(SCOPES))


def unauthorized(code: str, message: str) -> ApiError:
    desc = message.replace('"', "'")
    error = "invalid_request" if code == "unauthenticated" else "invalid_token"
    return ApiError(401, code, message, headers={
        "WWW-Authenticate": f'Bearer realm="appliance", error="{error}", error_description="{desc}"'})


class Authenticator:
    def __init__(self, s: Settings):
        self.disabled = auth_disabled(s)
        self.algorithm = s.jwt_algorithm
        self.key = None if self.disabled else verification_key(s)
        self.issuer = s.jwt_issuer or None
        self.audience = s.jwt_audience or None
        self.leeway = s.jwt_leeway_s
        self.tenant_claim = s.tenant_claim
        required = ["exp", "sub"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        self.options = {"require": required}
        self._cache: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, header: str | None) -> Principal:
        if self.disabled:
            return DEV_PRINCIPAL
        if not header:
            raise unauthorized("unauthenticated", "an `Authorization: Bearer <token>` header is required")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("unauthenticated", "the Authorization header must be `Bearer <token>`")
        if len(token) > _MAX_TOKEN:
            raise unauthorized("invalid_token", f"the token is longer than {_MAX_TOKEN} characters")
        hit = self._cache.get(token)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp + self.leeway:
                return principal
            self._cache.pop(token, None)  # two threads may find it expired at once
        principal, exp = self._verify(token)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(token, self.key, algorithms=[self.algorithm], issuer=self.issuer,
                                audience=self.audience, leeway=self.leeway, options=self.options)
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the token has expired") from None
        except jwt.InvalidAlgorithmError:
            raise unauthorized("invalid_token", f"the token's algorithm is not accepted (only {self.algorithm})") \
                from None
        except jwt.InvalidSignatureError:
            raise unauthorized("invalid_token", "the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("invalid_token", "the token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("invalid_token", "the token's issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthorized("invalid_token", f"the token lacks the `{exc.claim}` claim") from None
        except jwt.PyJWTError as exc:
            raise unauthorized("invalid_token", f"the token is not valid: {exc.__class__.__name__}") from None
        tenant = claims.get(self.tenant_claim)
        subject = claims.get("sub")
        if not isinstance(tenant, str) or not tenant or len(tenant) > 200 or not isinstance(subject, str):
            raise unauthorized("invalid_token", f"the token's `{self.tenant_claim}` claim must be a non-empty string")
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        return Principal(subject, tenant, frozenset(s for s in scopes if isinstance(s, str))), float(claims["exp"])
