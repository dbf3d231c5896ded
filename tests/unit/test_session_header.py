"""Which header names carry a request's session id (Ray's RAY_SERVE_SESSION_ID_HEADER_KEY)."""

from __future__ import annotations

import pytest

from flotilla._private.http_util import SESSION_HEADERS, _session_headers


@pytest.mark.parametrize(("configured", "sent", "matches"), [
    ("x-session-id", b"x-session-id", True),
    ("x-session-id", b"x_session_id", True),  # proxies that rewrite the separator
    ("X-Session-Id", b"x-session-id", True),  # ASGI gives names in lower case
    ("my_sticky_key", b"my-sticky-key", True),
    ("x-session-id", b"x-session", False),
    ("x-session-id", b"x-request-id", False),
])
def test_session_header_names(configured: str, sent: bytes, matches: bool) -> None:
    assert (sent in _session_headers(configured)) is matches


def test_the_default_is_x_session_id() -> None:
    assert b"x-session-id" in SESSION_HEADERS
