"""`listener.bind_tcp`: SO_REUSEPORT for the proxies of Ray nodes that share an address, and
`claim`, which still refuses a port some other socket holds."""

from __future__ import annotations

import socket

import pytest

from flotilla._private.listener import bind_tcp


def test_reuse_port_shares_a_claimed_port_and_claim_refuses_a_held_one() -> None:
    first = bind_tcp("127.0.0.1", 0, reuse_port=True, claim=True)
    port = first.getsockname()[1]
    try:
        with bind_tcp("127.0.0.1", port, reuse_port=True) as second:  # another node's proxy
            assert second.getsockname()[1] == port
            with pytest.raises(OSError):  # another session: refused, not shared
                bind_tcp("127.0.0.1", port, reuse_port=True, claim=True)
        with pytest.raises(OSError):
            bind_tcp("127.0.0.1", port)  # a plain bind (the local backend) is refused as before
    finally:
        first.close()


def test_claim_refuses_a_port_held_without_reuse_port() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        with pytest.raises(OSError):
            bind_tcp("127.0.0.1", held.getsockname()[1], reuse_port=True, claim=True)
