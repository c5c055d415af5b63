"""The embedded broker knows its own listener from another process's on the same port
(read from Linux's /proc, which the suite's machines have)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

import bridge.devtools.embedded as embedded
from bridge.devtools.embedded import (
    EmbeddedBroker,
    EmbeddedBrokerError,
    find_broker_binary,
    free_port,
    holds_listener,
)
from tests.conftest import unavailable


def test_the_owner_of_a_listening_port_is_told_from_other_processes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert holds_listener(os.getpid(), port) is True
            assert holds_listener(other.pid, port) is False
        finally:
            other.kill()
            other.wait()
    assert holds_listener(os.getpid(), free_port()) is None  # nobody listens there


@pytest.fixture
def squatter() -> Iterator[int]:
    """A port another process (this one) listens on; the embedded broker must be here."""
    try:
        find_broker_binary()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker: {exc}")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_broker_whose_port_another_process_took_refuses_to_start(squatter: int) -> None:
    with pytest.raises(EmbeddedBrokerError) as refused:
        EmbeddedBroker(port=squatter, start_timeout=10).start().stop()
    expected = f"another process listens on 127.0.0.1:{squatter}; choose another port"
    assert expected in str(refused.value)


def test_a_broker_that_chose_a_port_another_process_took_moves_to_a_free_one(
    squatter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([squatter, free_port()])
    monkeypatch.setattr(embedded, "free_port", lambda host: next(ports))
    broker = EmbeddedBroker(start_timeout=10).start()
    try:
        assert broker.port != squatter
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert holds_listener(broker.pid, broker.port) is True
    finally:
        broker.stop()
