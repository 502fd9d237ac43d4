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

Guessing: every refused credential counts against the client's address, and a wrong password for
the configured user also against that user. ``MAX_FAILURES_PER_ADDRESS`` failures within
``FAILURE_WINDOW_S`` (``MAX_FAILURES_PER_USER`` for the user, from any number of addresses) lock
that key out for ``LOCKOUT_S``: requests are then answered 429 with Retry-After, the right password
included, and cost no hash. A try counts as a failure as soon as it starts (undone when it succeeds),
so concurrent guesses cannot slip past the limit; at most ``MAX_TRACKED`` addresses are remembered
(the least recently seen forgotten first). A success forgives its address, never the user's
count of other addresses' guesses. An unknown user name is checked against a dummy hash of the same
cost, so it answers no faster than a wrong password, and at most ``MAX_CONCURRENT_HASHES`` scrypt
checks run at once (16 MiB each), so a flood of guesses cannot grow the process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ctp_node.config import WebSettings
from ctp_node.errors import ConfigError
from ctp_node.web.passwords import PasswordHashError, hash_password, parse_hash, verify_password

REALM = "ctp-node"
CSRF_MAX_AGE_S = 12 * 3600
DEFAULT_PORTS = {"http": 80, "https": 443}

MAX_FAILURES_PER_ADDRESS = 10
MAX_FAILURES_PER_USER = 50
FAILURE_WINDOW_S = 600.0
LOCKOUT_S = 900.0
MAX_TRACKED = 10_000
MAX_CONCURRENT_HASHES = 2


class WebConfigError(ConfigError):
    """The [web] section names a secret that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``scheme`` is "bearer" or "basic"; ``name`` the basic user or "token"."""

    name: str
    scheme: str


class Throttled(Exception):
    """Too many refused credentials from this address or for this user: try again in ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed logins; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class _Failures:
    """Failed-login counts per key within a window, and the lockouts they caused."""

    __slots__ = ("since", "count", "locked_until")

    def __init__(self, now: float) -> None:
        self.since, self.count, self.locked_until = now, 0, 0.0


class FailureThrottle:
    """Counts refused credentials per client address and per user, and locks out those over the limit."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_per_address: int = MAX_FAILURES_PER_ADDRESS,
        max_per_user: int = MAX_FAILURES_PER_USER,
        window_s: float = FAILURE_WINDOW_S,
        lockout_s: float = LOCKOUT_S,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.clock = clock
        self.max_per_address, self.max_per_user = max_per_address, max_per_user
        self.window_s, self.lockout_s, self.max_tracked = window_s, lockout_s, max_tracked
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()  # least recently seen first
        self._users: dict[str, _Failures] = {}  # only the configured user: never evicted
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._addresses) + len(self._users)

    def begin(self, address: str, user: str | None) -> float:
        """Count a try as failed in advance; Throttled when its address or user is locked out."""
        now = self.clock()
        with self._lock:
            entries = [(self._entry(self._addresses, address, now), self.max_per_address)]
            if user is not None:
                entries.append((self._entry(self._users, user, now), self.max_per_user))
            locked_until = max(entry.locked_until for entry, _ in entries)
            if locked_until > now:
                raise Throttled(locked_until - now)
            for entry, limit in entries:
                if now - entry.since > self.window_s:
                    entry.since, entry.count = now, 0
                entry.count += 1
                if entry.count >= limit:
                    entry.locked_until = now + self.lockout_s
            return now

    def succeeded(self, address: str, user: str | None) -> None:
        """Undo the try counted in advance: forget the address's failures, take one off the user's."""
        with self._lock:
            self._addresses.pop(address, None)
            entry = self._users.get(user) if user is not None else None
            if entry is not None:
                entry.count = max(entry.count - 1, 0)
                if entry.count < self.max_per_user:
                    entry.locked_until = 0.0

    def _entry(self, table: dict[str, _Failures], key: str, now: float) -> _Failures:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = _Failures(now)
            if isinstance(table, OrderedDict) and len(table) > self.max_tracked:
                table.popitem(last=False)
        elif isinstance(table, OrderedDict):
            table.move_to_end(key)
        return entry


_HASHING = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)  # scrypt takes 16 MiB a check


class Authenticator:
    def __init__(
        self,
        token: str | None = None,
        basic_user: str | None = None,
        basic_hash: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if token is None and basic_user is None:
            raise WebConfigError("the status page needs a token or a basic user (see [web] in the configuration)")
        if (basic_user is None) != (basic_hash is None):
            raise WebConfigError("basic authentication needs both basic_user and basic_password_hash")
        if token is not None and len(token) < 16:
            raise WebConfigError("web: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        self._dummy_hash: str | None = None
        if basic_hash is not None:
            try:
                n, r, p, _, _ = parse_hash(basic_hash)
            except PasswordHashError as exc:
                raise WebConfigError(str(exc)) from exc
            # What an unknown user's password is checked against: the same cost as the real one.
            self._dummy_hash = hash_password(base64.b64encode(os.urandom(24)).decode(), n=n, r=r, p=p)
        self.throttle = FailureThrottle(clock)
        self._token = token.encode() if token is not None else None
        self._user = basic_user
        self._hash = basic_hash
        # Passwords already verified, as HMACs under a key of this process: scrypt runs once per
        # password, not once per request (a browser resends basic credentials with every request).
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, web: WebSettings, clock: Callable[[], float] = time.monotonic) -> Authenticator:
        """The credentials of the [web] section, read here at start (ConfigError: which and why)."""
        try:
            token = web.token.read() if web.token is not None else None
        except ConfigError as exc:
            raise WebConfigError(f"web.token: {exc}") from exc
        try:
            basic_hash = web.basic_password_hash.read() if web.basic_password_hash is not None else None
        except ConfigError as exc:
            raise WebConfigError(f"web.basic_password_hash: {exc}") from exc
        return cls(token, web.basic_user, basic_hash, clock)

    @property
    def tracked(self) -> int:
        """How many addresses and users the failure throttle remembers (bounded)."""
        return len(self.throttle)

    @property
    def accepts_basic(self) -> bool:
        return self._user is not None

    def challenge(self) -> str:
        """The WWW-Authenticate header of a 401: basic when configured (so a browser asks), else bearer."""
        if self.accepts_basic:
            return f'Basic realm="{REALM}", charset="UTF-8"'
        return f'Bearer realm="{REALM}"'

    def authenticate(self, authorization: str | None, client: str = "?") -> Principal | None:
        """The principal of an Authorization header, or None when it is absent or wrong.

        ``client`` is the address the request came from; Throttled when it, or the user it names,
        has had too many credentials refused lately (see the module's docstring).
        """
        if not authorization:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        basic: tuple[str, str] | None = None  # user and password
        if scheme == "basic" and self._user is not None:
            try:
                user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, sep, password = "", "", ""
            basic = (user, password) if sep else None
        known_user = basic is not None and self._is_user(basic[0])
        self.throttle.begin(client, self._user if known_user else None)
        found = self._check(scheme, credentials, basic, known_user)
        if found is not None:
            self.throttle.succeeded(client, self._user if found.scheme == "basic" else None)
        return found

    def _is_user(self, user: str) -> bool:
        assert self._user is not None
        return hmac.compare_digest(user.encode(), self._user.encode())

    def _check(self, scheme: str, credentials: str, basic: tuple[str, str] | None, known: bool) -> Principal | None:
        if scheme == "bearer" and self._token is not None:
            if hmac.compare_digest(credentials.encode(), self._token):
                return Principal("token", "bearer")
            return None
        if scheme == "basic" and basic is not None:
            user, password = basic
            # An unknown user's password is checked too, against the dummy hash: the same time as a wrong one.
            ok = self._password_ok(password, self._hash if known else self._dummy_hash)
            if ok and known:
                return Principal(user, "basic")
        return None

    def _password_ok(self, password: str, encoded: str | None) -> bool:
        assert encoded is not None
        digest = hmac.new(self._key, password.encode(), hashlib.sha256).digest()
        with self._lock:
            if encoded is self._hash and digest in self._verified:
                return True
        with _HASHING:
            if not verify_password(password, encoded):
                return False
        if encoded is self._hash:
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
