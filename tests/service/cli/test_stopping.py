"""A SIGTERM that Python drops (raised inside a finalizer) still stops the command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import gc, os, signal, sys, time, weakref
    from service.cli import stopping

    stopping.install(once={once})

    class Thing:
        pass

    def in_a_finalizer(_ref):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here; its KeyboardInterrupt is "ignored" by Python

    thing = Thing()
    ref = weakref.ref(thing, in_a_finalizer)
    del thing
    gc.collect()
    print("past the finalizer", flush=True)
    try:
        time.sleep(20)
        print("not stopped", flush=True)
    except KeyboardInterrupt:
        stopping.acknowledge()
        print("stopped", flush=True)
        signal.raise_signal(signal.SIGTERM)  # {after_ack}
        time.sleep(0.5)
        print("drained", flush=True)
    """
)


def _run(once: bool) -> tuple[str, float]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(once=once, after_ack="ignored once acknowledged")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout + out.stderr, time.monotonic() - t0


def test_a_sigterm_lost_in_a_finalizer_is_sent_again() -> None:
    output, elapsed = _run(once=True)
    assert "Exception ignored" in output  # the first one really was dropped by Python
    assert "past the finalizer" in output
    assert "stopped" in output.split("past the finalizer")[1] and "not stopped" not in output, output
    assert "sending SIGTERM again" in output
    assert "drained" in output, output  # once: a SIGTERM after the acknowledgement cannot cut the drain
    assert elapsed < 15, elapsed


def test_without_once_a_later_sigterm_still_interrupts() -> None:
    output, _ = _run(once=False)
    assert "stopped" in output and "drained" not in output, output  # "stop now" to a draining command
