"""Who may see the status page and act on jobs, and how a posted action is known to come from the page.

Authentication: a bearer token (``Authorization: Bearer ...``, for scripts) and/or HTTP basic
authentication with a user and a scrypt password hash (browsers). Every page but ``/healthz``
needs one of them.

Cross-site request forgery: a browser attaches basic credentials by itself to any request to the
page, including a form another site makes it post. So a browser's action must also carry a token
that only the page's own HTML contains (another site cannot read it: same-origin policy, and the
page sends no CORS headers): an HMAC, under a key made at start, of the user and the time it was
issued, valid for ``CSRF_MAX_AGE_S``. As a second, independent check, an action whose ``Origin``
header names another site is refused. A bearer token is never attached by a browser on its own,
so a request authenticated by one needs neither.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from ctp_node.config import ConfigError, WebSettings
from ctp_node.web.passwords import PasswordHashError, parse_hash, verify_password

REALM = "ctp-node"
CSRF_MAX_AGE_S = 12 * 3600
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebConfigError(ConfigError):
    """The [web] section names a secret that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``scheme`` is "bearer" or "basic"; ``name`` the basic user or "token"."""

    name: str
    scheme: str


class Authenticator:
    def __init__(self, token: str | None = None, basic_user: str | None = None, basic_hash: str | None = None) -> None:
        if token is None and basic_user is None:
            raise WebConfigError("the status page needs a token or a basic user (see [web] in the configuration)")
        if (basic_user is None) != (basic_hash is None):
            raise WebConfigError("basic authentication needs both basic_user and basic_password_hash")
        if token is not None and len(token) < 16:
            raise WebConfigError("web: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        if basic_hash is not None:
            try:
                parse_hash(basic_hash)
            except PasswordHashError as exc:
                raise WebConfigError(str(exc)) from exc
        self._token = token.encode() if token is not None else None
        self._user = basic_user
        self._hash = basic_hash
        # Passwords already verified, as HMACs under a key of this process: scrypt runs once per
        # password, not once per request (a browser resends basic credentials with every request).
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, web: WebSettings) -> Authenticator:
        """The credentials of the [web] section, read here at start (ConfigError: which and why)."""
        try:
            token = web.token.read() if web.token is not None else None
        except ConfigError as exc:
            raise WebConfigError(f"web.token: {exc}") from exc
        try:
            basic_hash = web.basic_password_hash.read() if web.basic_password_hash is not None else None
        except ConfigError as exc:
            raise WebConfigError(f"web.basic_password_hash: {exc}") from exc
        return cls(token, web.basic_user, basic_hash)

    @property
    def accepts_basic(self) -> bool:
        return self._user is not None

    def challenge(self) -> str:
        """The WWW-Authenticate header of a 401: basic when configured (so a browser asks), else bearer."""
        if self.accepts_basic:
            return f'Basic realm="{REALM}", charset="UTF-8"'
        return f'Bearer realm="{REALM}"'

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an Authorization header, or None when it is absent or wrong."""
        if not authorization:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and self._token is not None:
            if hmac.compare_digest(credentials.encode(), self._token):
                return Principal("token", "bearer")
            return None
        if scheme == "basic" and self._user is not None:
            try:
                user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            if sep and hmac.compare_digest(user.encode(), self._user.encode()) and self._password_ok(password):
                return Principal(user, "basic")
        return None

    def _password_ok(self, password: str) -> bool:
        digest = hmac.new(self._key, password.encode(), hashlib.sha256).digest()
        with self._lock:
            if digest in self._verified:
                return True
        assert self._hash is not None
        if not verify_password(password, self._hash):
            return False
        with self._lock:
            self._verified.add(digest)
        return True


class CsrfTokens:
    """Stateless synchronizer tokens: ``<issued unix time>.<HMAC(key, user|time)>``."""

    def __init__(self, key: bytes | None = None, max_age_s: float = CSRF_MAX_AGE_S) -> None:
        self._key = key or os.urandom(32)
        self.max_age_s = max_age_s

    def issue(self, principal: Principal, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return f"{issued}.{self._mac(principal, issued)}"

    def valid(self, token: str | None, principal: Principal, now: float | None = None) -> bool:
        issued_text, _, mac = (token or "").partition(".")
        if not issued_text.isdigit() or not mac:
            return False
        issued = int(issued_text)
        age = (time.time() if now is None else now) - issued
        return 0 <= age <= self.max_age_s and hmac.compare_digest(mac, self._mac(principal, issued))

    def _mac(self, principal: Principal, issued: int) -> str:
        message = f"{principal.scheme}|{principal.name}|{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _netloc(scheme: str, host: str) -> str:
    """host[:port] in lower case, without the scheme's default port."""
    host = host.strip().lower()
    default = DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(f":{default}"):
        host = host[: -len(f":{default}")]
    return host


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...] = ()) -> bool:
    """False when a request's Origin names another site than the page (``host``) or ``allowed``.

    No Origin header at all (older clients, command-line tools) passes: the CSRF token decides.
    "null" (a sandboxed frame, a privacy redirect) is refused.
    """
    if origin is None:
        return True
    origin = origin.strip()
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    parts = urlsplit(origin)
    if origin == "null" or not parts.scheme or not parts.netloc or not host:
        return False
    # The Host a reverse proxy passes may lack the port the browser used or carry the default one;
    # compare both without default ports (deploy/README.md: pass Host with its port).
    return _netloc(parts.scheme, parts.netloc) == _netloc(parts.scheme, host)
