"""Endpoints that refuse or never answer: the wait is reported while it happens (what is
waited for, for how long, which retry), and it ends in an error naming the URL."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from logitcache import CacheError
from logitcache.retry import RetryPolicy, call_with_retry
from logitcache.storage import RemoteStore

from .conftest import s3_options


@pytest.fixture
def silent_endpoint():
    """A loopback TCP server that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_retries_are_reported_with_the_url(caplog):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connections are refused

    def connect():
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    policy = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02)
    with caplog.at_level(logging.WARNING, logger="logitcache"), pytest.raises(CacheError) as info:
        call_with_retry(connect, url="s3://b/c/manifest.json", what="read it", policy=policy)
    assert "s3://b/c/manifest.json: could not read it after 3 attempts" in str(info.value)
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(waits) == 2
    assert "s3://b/c/manifest.json: could not read it (ConnectionRefusedError" in waits[0]
    assert "attempt 2 of 3" in waits[0]


def test_a_silent_endpoint_is_reported_while_waiting(silent_endpoint, caplog):
    options = s3_options(silent_endpoint)
    options["config_kwargs"]["read_timeout"] = 0.2
    store = RemoteStore(
        "s3://bucket/cache",
        options,
        retry=RetryPolicy(attempts=1, report_after_s=0.3),
    )
    with caplog.at_level(logging.WARNING, logger="logitcache"), pytest.raises(CacheError) as info:
        store.exists("manifest.json")
    assert "s3://bucket/cache/manifest.json" in str(info.value)
    stalls = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert stalls and "s3://bucket/cache/manifest.json" in stalls[0]


def test_s3_stores_get_a_connect_timeout_unless_one_is_given():
    from logitcache.storage import S3_CONNECT_TIMEOUT_S, _with_default_timeouts

    got = _with_default_timeouts("s3://b/c", {"key": "k"})
    assert got["config_kwargs"]["connect_timeout"] == S3_CONNECT_TIMEOUT_S
    mine = _with_default_timeouts("s3://b/c", {"config_kwargs": {"connect_timeout": 99}})
    assert mine["config_kwargs"]["connect_timeout"] == 99
    assert _with_default_timeouts("gs://b/c", {}) == {}
