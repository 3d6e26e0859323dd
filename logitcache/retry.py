"""Retrying remote requests: which errors are transient, and a bounded backoff around a call.

Timeouts, resets and 5xx responses are retried with jittered exponential backoff inside a
time budget; 403 and 404 fail at once with an error that names the URL.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .format import CacheError, CorruptCacheError

T = TypeVar("T")
# Retries are reported as warnings: without a handler configured, Python prints them to stderr,
# so a user waiting on an unreachable endpoint sees what is being waited for.
log = logging.getLogger("logitcache")


class RemoteNotFoundError(CacheError, FileNotFoundError):
    """A remote object does not exist (HTTP 404 or the backend's equivalent)."""


class RemoteAccessError(CacheError, PermissionError):
    """The remote store refused access (HTTP 403 or the backend's equivalent)."""


class TransientDownloadError(CacheError):
    """A download came back short or with the wrong checksum; fetching it again may succeed."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying transient remote errors: attempts and a wall-clock budget.

    Delays grow exponentially from `base_delay_s` to `max_delay_s` with full jitter, so many
    workers that fail together do not retry together.
    """

    attempts: int = 8
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    budget_s: float = 120.0
    # A request still running after this long is reported (and again every 3x as long), so
    # a stalled endpoint is never waited on in silence.
    report_after_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * (2**attempt)))


# Exception class names (anywhere in the cause chain) that mean "the network hiccupped".
_TRANSIENT_NAMES = frozenset(
    {
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "IncompleteRead",
        "ResponseStreamingError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ProtocolError",
        "FSTimeoutError",
        "ResponseParserError",
        "HTTPClientError",
        "FlexibleChecksumError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EBUSY,  # s3fs maps 503 SlowDown to EBUSY
        getattr(errno, "EREMOTEIO", 121),  # s3fs maps 500 InternalError to EREMOTEIO
    }
)


def _cause_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    for e in _cause_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
            code = str(response.get("Error", {}).get("Code", ""))
            if code.isdigit():
                return int(code)
        status = getattr(e, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the request that raised `exc` may succeed (timeouts, 5xx, resets)."""
    if isinstance(exc, TransientDownloadError):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | CacheError):
        return False
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    for e in _cause_chain(exc):
        if isinstance(e, TimeoutError | ConnectionError):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def call_with_retry(fn: Callable[[], T], *, url: str, what: str, policy: RetryPolicy) -> T:
    """Run `fn`, retrying transient errors under `policy`; permanent ones fail at once.

    Errors are re-raised as CacheError subclasses whose message names the URL.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            with _report_if_slow(url, what, policy.report_after_s):
                return fn()
        except Exception as exc:
            if isinstance(exc, FileNotFoundError) and not isinstance(exc, CacheError):
                raise RemoteNotFoundError(f"{url}: not found while trying to {what}") from exc
            if isinstance(exc, PermissionError) and not isinstance(exc, CacheError):
                raise RemoteAccessError(
                    f"{url}: access denied while trying to {what}; check the credentials "
                    "and permissions in storage_options"
                ) from exc
            if not is_transient(exc):
                if isinstance(exc, CacheError):
                    raise
                raise CacheError(f"{url}: could not {what}: {exc!r}") from exc
            attempt += 1
            elapsed = time.monotonic() - start
            if attempt >= policy.attempts or elapsed >= policy.budget_s:
                kind = CorruptCacheError if isinstance(exc, TransientDownloadError) else CacheError
                raise kind(
                    f"{url}: could not {what} after {attempt} attempts in {elapsed:.1f}s; "
                    f"last error: {exc}"
                ) from exc
            delay = min(policy.delay(attempt), max(0.0, policy.budget_s - elapsed))
            log.warning(
                "logitcache: %s: could not %s (%s); retrying in %.1f s (attempt %d of %d, "
                "%.0f s of a %.0f s budget used)",
                url,
                what,
                _short(exc),
                delay,
                attempt + 1,
                policy.attempts,
                elapsed,
                policy.budget_s,
            )
            time.sleep(delay)


@contextlib.contextmanager
def _report_if_slow(url: str, what: str, after_s: float):
    """Log a warning while the block runs longer than `after_s` seconds."""
    done = threading.Event()
    start = time.monotonic()

    def watch() -> None:
        wait = after_s
        while not done.wait(wait):
            log.warning(
                "logitcache: still waiting to %s %s (%.0f s so far); check that the endpoint "
                "in storage_options is reachable",
                what,
                url,
                time.monotonic() - start,
            )
            wait *= 3

    watcher = threading.Thread(target=watch, name="logitcache-slow-request", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
