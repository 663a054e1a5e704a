"""SIGTERM as a stop request that cannot be lost.

The long-running commands turn SIGTERM into ``KeyboardInterrupt`` in the main thread, which is
how a blocking ``serve_forever`` or ``wait`` is left. Python runs a signal handler wherever the
main thread happens to be, and an exception raised inside a ``__del__`` or a weakref callback
(SQLAlchemy registers some) is printed as "Exception ignored" and dropped: the stop was lost and
``lusai serve`` went on serving with its worker gone (seen in CI; one start in about twelve when
stopped just after its worker starts on a loaded machine). So the first SIGTERM also starts a
thread that sends it again every ``RESEND_S`` until the command says it is stopping
(:func:`acknowledge`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("lusai.cli")

RESEND_S = 2.0
_requested = threading.Event()
_acknowledged = threading.Event()


def install(*, once: bool = False) -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread. ``once``: after the command has
    acknowledged the stop, later SIGTERMs are ignored, so a service manager's signal to every
    process of the unit, on top of ours, cannot cut a drain; otherwise a later one means "stop
    now" to the code that is draining (``stop_worker`` kills at once)."""

    def _on_term(_signum: int, _frame: object) -> None:
        if _acknowledged.is_set() and once:
            return
        if not _requested.is_set():
            _requested.set()
            threading.Thread(target=_resend_until_acknowledged, name="lusai-stop", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)


def acknowledge() -> None:
    """The command has seen the stop request and is on its way out: no more re-sends."""
    _acknowledged.set()


def requested() -> bool:
    return _requested.is_set()


def _resend_until_acknowledged() -> None:
    while not _acknowledged.wait(RESEND_S):
        if sys.is_finalizing():
            return
        log.warning("stop request not acted on (lost in a finalizer): sending SIGTERM again")
        os.kill(os.getpid(), signal.SIGTERM)
