"""The [web] section, the password hashes and the origin check, without a page."""

from __future__ import annotations

import pytest

from ctp_node.config import Settings, load_settings
from ctp_node.errors import ConfigError
from ctp_node.web.auth import Authenticator, CsrfTokens, Principal, WebConfigError, origin_allowed
from ctp_node.web.passwords import PasswordHashError, hash_password, verify_password

TOKEN = "0123456789abcdef0123"


def test_the_page_is_off_and_on_loopback_by_default():
    web = Settings().web
    assert web.enabled is False and web.bind_address == "127.0.0.1" and web.mask_patient is True


def test_enabling_the_page_without_authentication_is_refused(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[web]\nenabled = true\n")
    with pytest.raises(ConfigError, match="needs authentication"):
        load_settings(config)


@pytest.mark.parametrize(
    "web, message",
    [
        ({"token": "0123456789abcdef0123"}, "token"),  # a secret in the TOML itself: refused
        ({"token": {"env": "A", "file": "/run/secrets/token"}}, "exactly one"),
        ({"basic_user": "operator"}, "needs both"),
        ({"basic_password_hash": {"file": "/etc/ctp-node/web-password.hash"}}, "needs both"),
        ({"basic_user": "a:b", "basic_password_hash": {"env": "H"}}, "basic_user"),
        ({"token": {"env": "T"}, "root_path": "status/"}, "root_path"),
    ],
)
def test_unusable_web_settings_are_refused(web, message):
    with pytest.raises(ValueError, match=message):
        Settings(web={"enabled": True, **web})


def test_the_token_stays_in_the_environment_and_is_never_printed(monkeypatch):
    monkeypatch.setenv("CTP_NODE_WEB__ENABLED", "true")
    monkeypatch.setenv("CTP_NODE_WEB__TOKEN__ENV", "PAGE_TOKEN")
    monkeypatch.setenv("PAGE_TOKEN", TOKEN)
    settings = load_settings(None)
    assert Authenticator.from_settings(settings.web).authenticate(f"Bearer {TOKEN}") is not None
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.to_toml_dict())
    assert Settings(**settings.to_toml_dict()).web == settings.web  # what `ctp-node config` prints loads again


def test_a_password_hash_verifies_its_password_only():
    encoded = hash_password("correct horse battery staple", n=2**10)
    assert encoded.startswith("scrypt$1024$8$1$")
    assert verify_password("correct horse battery staple", encoded)
    assert not verify_password("correct horse battery stapler", encoded)
    assert hash_password("same", n=2**10) != hash_password("same", n=2**10)  # salted


@pytest.mark.parametrize("encoded", ["", "bcrypt$2b$...", "scrypt$1000$8$1$c2FsdA==$a2V5", "scrypt$x$8$1$a$b"])
def test_a_malformed_hash_is_refused_at_start(encoded):
    with pytest.raises(PasswordHashError):
        verify_password("x", encoded)
    with pytest.raises(WebConfigError):
        Authenticator(basic_user="operator", basic_hash=encoded)


def test_the_password_hash_command_reads_a_piped_password(monkeypatch, capsys):
    import io

    from ctp_node.web import passwords

    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert passwords.main() == 0
    assert verify_password("a long enough password", capsys.readouterr().out.strip())
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert passwords.main() == 2


def test_csrf_tokens_are_bound_to_the_user_and_the_process():
    tokens = CsrfTokens()
    alice, bob = Principal("alice", "basic"), Principal("bob", "basic")
    token = tokens.issue(alice, now=1000)
    assert tokens.valid(token, alice, now=1001)
    assert not tokens.valid(token, bob, now=1001)
    assert not CsrfTokens().valid(token, alice, now=1001)  # another process (a restart): another key
    assert not tokens.valid(token, alice, now=1000 + tokens.max_age_s + 1)
    assert not tokens.valid(token, alice, now=999)  # issued in the future


@pytest.mark.parametrize(
    "origin, host, allowed, ok",
    [
        (None, "node:8080", (), True),  # no Origin (curl): the CSRF token decides
        ("http://node:8080", "node:8080", (), True),
        ("https://node.example", "node.example:443", (), True),  # a proxy that passes the default port
        ("https://node.example:8443", "node.example", (), False),  # a proxy that drops the port (see README)
        ("https://evil.example", "node.example", (), False),
        ("http://node:8080.evil.example", "node:8080", (), False),
        ("null", "node:8080", (), False),
        ("https://ops.example", "node:8080", ("https://ops.example/",), True),
    ],
)
def test_origin_check(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


def _counting_verifier(monkeypatch) -> list[str]:
    import ctp_node.web.auth as auth_module

    calls: list[str] = []
    real = auth_module.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth_module, "verify_password", counting)
    return calls


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_an_unknown_user_costs_a_hash_verification_like_a_wrong_password(monkeypatch):
    calls = _counting_verifier(monkeypatch)
    auth = Authenticator(basic_user="operator", basic_hash=hash_password("correct horse battery staple", n=2**10))
    assert auth.authenticate(_basic("operator", "wrong password"), client="10.0.0.1") is None
    wrong_password = len(calls)
    assert auth.authenticate(_basic("someone", "wrong password"), client="10.0.0.2") is None
    wrong_user = len(calls) - wrong_password
    assert wrong_password == 1 and wrong_user == 1


def test_the_failures_tracked_stay_bounded_under_many_names_and_addresses(monkeypatch):
    from ctp_node.web.auth import MAX_TRACKED

    monkeypatch.setattr("ctp_node.web.auth.verify_password", lambda password, encoded: False)  # no scrypt
    auth = Authenticator(basic_user="operator", basic_hash=hash_password("correct horse battery staple", n=2**10))
    for i in range(MAX_TRACKED + 500):
        auth.authenticate(_basic(f"user{i}", "guess"), client=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert auth.tracked <= MAX_TRACKED + 1  # the addresses (capped) and the one configured user
