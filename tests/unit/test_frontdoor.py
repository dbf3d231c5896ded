"""frontdoor.py: API key checks, option handling, redaction, the exposure warning."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from flotilla._private import frontdoor
from flotilla.serve.config import HTTPOptions, validate
from flotilla.serve.exceptions import ConfigError


def guard(*keys: str) -> frontdoor.KeyGuard:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    return frontdoor.KeyGuard(app, [frontdoor.digest(k) for k in keys], "/root", "proxy")


def call(g: frontdoor.KeyGuard, path: str, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    asyncio.run(g({"type": "http", "path": path, "headers": headers}, receive, send))
    return sent


def test_reason() -> None:
    g = guard("alpha", "beta")
    assert g.reason([]) == "missing"
    assert g.reason([(b"authorization", b"Bearer alpha")]) is None
    assert g.reason([(b"authorization", b"bearer beta")]) is None
    assert g.reason([(b"authorization", b"Bearer gamma")]) == "invalid"
    assert g.reason([(b"authorization", b"Basic alpha")]) == "invalid"
    assert g.reason([(b"authorization", b"Bearer ")]) == "invalid"
    assert g.reason([(b"authorization", b"alpha")]) == "invalid"


def test_guard_answers_401_and_keeps_healthz_open() -> None:
    g = guard("alpha")
    sent = call(g, "/app", [])
    assert sent[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in sent[0]["headers"]
    assert call(g, "/root/-/healthz", [])[0]["status"] == 200
    assert call(g, "/-/healthz", [])[0]["status"] == 200
    assert call(g, "/root/-/routes", [])[0]["status"] == 401
    assert call(g, "/app", [(b"authorization", b"Bearer alpha")])[0]["status"] == 200


def test_driver_options_hash_keys_and_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(frontdoor.KEYS_ENV, raising=False)
    opts = frontdoor.driver_options(validate(HTTPOptions, {"api_keys": ["k1", "k2"]}, "http_options").model_dump())
    assert "api_keys" not in opts and opts[frontdoor.DIGESTS] == sorted([frontdoor.digest("k1"), frontdoor.digest("k2")])
    assert "k1" not in repr(opts)
    monkeypatch.setenv(frontdoor.KEYS_ENV, " e1, e2 ,")
    opts = frontdoor.driver_options(validate(HTTPOptions, {}, "http_options").model_dump())
    assert opts[frontdoor.DIGESTS] == sorted([frontdoor.digest("e1"), frontdoor.digest("e2")])
    monkeypatch.delenv(frontdoor.KEYS_ENV)
    assert frontdoor.DIGESTS not in frontdoor.driver_options(validate(HTTPOptions, {}, "http_options").model_dump())


def test_redact() -> None:
    opts = {"host": "h", "ssl_keyfile_password": "pw", frontdoor.DIGESTS: ["d"], "api_keys": None}
    out = frontdoor.redact(opts)
    assert out == {"host": "h", "ssl_keyfile_password": "<redacted>", frontdoor.DIGESTS: "<redacted>", "api_keys": None}


def test_validation_names_the_file_and_the_entry(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"ssl_certfile.*missing\.pem.*does not exist"):
        validate(HTTPOptions, {"ssl_certfile": str(tmp_path / "missing.pem")}, "http_options")
    with pytest.raises(ConfigError, match="entry 0 is str"):
        validate(HTTPOptions, {"middlewares": ["CORSMiddleware"]}, "http_options")
    with pytest.raises(ConfigError, match="API keys"):
        validate(HTTPOptions, {"api_keys": ["a,b"]}, "http_options")


def test_loopback_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert frontdoor.is_loopback("127.0.0.1") and frontdoor.is_loopback("::1") and frontdoor.is_loopback("localhost")
    assert not frontdoor.is_loopback("0.0.0.0") and not frontdoor.is_loopback("10.1.2.3")
    frontdoor._warned.clear()
    with caplog.at_level(logging.WARNING, logger="flotilla.frontdoor"):
        frontdoor.warn_if_open({"host": "127.0.0.1"})
        frontdoor.warn_if_open({"host": "0.0.0.0", frontdoor.DIGESTS: ["d"]})
        assert not caplog.records
        frontdoor.warn_if_open({"host": "0.0.0.0"})
        frontdoor.warn_if_open({"host": "0.0.0.0"})
    assert len(caplog.records) == 1 and "unencrypted and unauthenticated" in caplog.records[0].getMessage()


def test_bearer_ok() -> None:
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
    assert frontdoor.bearer_ok(head, b"tok")
    assert not frontdoor.bearer_ok(head, b"other")
    assert not frontdoor.bearer_ok(b"GET / HTTP/1.1\r\nHost: x", b"tok")
    assert not frontdoor.bearer_ok(b"GET / HTTP/1.1\r\nAuthorization: Basic tok", b"tok")
