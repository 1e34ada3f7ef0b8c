"""Ctrl-C and SIGTERM held back while a unit of work must not be cut in two."""

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["held"]


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then raise KeyboardInterrupt.

    Used where an interrupt would leave a half-done state: numpy's and torch's imports
    (they swallow a KeyboardInterrupt in their import-time fallbacks and go on
    half-imported: seen, numpy without ``multiply``), and an epoch's checkpoint, metrics
    and pictures (a checkpoint of epoch 3 beside a metrics table that ends at 2)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    caught = []
    # A signal the process was started to ignore (a background job of a script, nohup's
    # kind) stays ignored: holding it would turn it into an interrupt.
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt
