"""Password hashes for the status page's basic authentication: scrypt (standard library), salted.

A hash reads ``scrypt$N$r$p$<salt, base64>$<key, base64>``, so the cost can be raised later without
breaking the hashes already configured. Make one with ``python -m ctp_node.web.passwords`` (asks for
the password twice, prints the hash for ``[web] basic_password_hash``).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys

SCHEME = "scrypt"
# 16 MiB of memory per check (128 * N * r bytes), about 50 ms on one core: dear for a guesser, cheap
# for the page, which remembers a verified password for the process' life (ctp_node.web.auth).
COST_N, BLOCK_R, PARALLEL_P = 2**14, 8, 1
KEY_BYTES, SALT_BYTES = 32, 16


class PasswordHashError(ValueError):
    """The configured hash is not one this module makes."""


def hash_password(password: str, *, n: int = COST_N, r: int = BLOCK_R, p: int = PARALLEL_P) -> str:
    if not password:
        raise ValueError("the password is empty")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p)
    return "$".join((SCHEME, str(n), str(r), str(p), _b64(salt), _b64(key)))


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; PasswordHashError when ``encoded`` is malformed."""
    n, r, p, salt, key = parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.strip().split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise PasswordHashError(
            "basic_password_hash is not a scrypt hash (scrypt$N$r$p$salt$key); make one with "
            "`python -m ctp_node.web.passwords`"
        )
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as exc:
        raise PasswordHashError(f"basic_password_hash is malformed ({exc}); make a new one") from exc
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or len(key) < 16:
        raise PasswordHashError("basic_password_hash has invalid scrypt parameters; make a new one")
    return n, r, p, salt, key


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r * p + 2**20, dklen=KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    """Ask for a password (twice, without echo) and print its hash."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ctp_node.web.passwords",
        description="Make the scrypt hash of a password for the status page's HTTP basic authentication "
        "([web] basic_password_hash in the node's configuration). On a terminal it asks for the password "
        "twice, without echo; otherwise it reads the first line of standard input. The hash goes to "
        "standard output: keep it in a file or an environment variable, not in the TOML.",
        epilog="Example: python -m ctp_node.web.passwords > /etc/ctp-node/web-password.hash, then "
        'basic_password_hash = {file = "/etc/ctp-node/web-password.hash"} under [web].',
    )
    parser.parse_args([] if argv is None else argv)  # called from code: not the caller's sys.argv
    if sys.stdin.isatty():
        first = getpass.getpass("password for the status page: ")
        if first != getpass.getpass("again: "):
            print("the passwords differ", file=sys.stderr)
            return 2
    else:  # piped: the first line is the password
        first = sys.stdin.readline().rstrip("\n")
    if len(first) < 12:
        print("use at least 12 characters", file=sys.stderr)
        return 2
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
