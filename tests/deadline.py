"""A test-side timeout: fail with a message instead of hanging the suite."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int, message: str):
    """Raise ``TimeoutError(message)`` when the block runs longer than ``seconds`` (SIGALRM: main
    thread only)."""
    def expire(signum, frame):
        raise TimeoutError(message)
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
