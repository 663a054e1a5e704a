"""SIGTERM to the long-running commands (issue 12, shutdown campaign, ``bench/chaos/shutdown.py``).

- ``stop_worker`` (``lusai serve`` / ``lusai worker``): a worker that outlives its shutdown grace is
  killed with its whole tree, and the jobs those processes held are handed to ``requeue`` (they
  stayed RUNNING until the stale-job sweep, 30 minutes later).
- ``lusai scp`` and ``lusai scp --processes N`` (what the systemd unit runs): an association in
  progress is served to its end, no new one is accepted, and the exit code is 0 (it was 130, and
  with several processes the children died at once, cutting every transfer in flight).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE

from service.cli.serve import process_tree, stop_worker
from tests.conftest import free_port
from tests.factories import cine

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
STUBBORN = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", {DEAF!r}])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_killed_after_its_grace_has_its_jobs_requeued() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    calls: list[set[int]] = []
    t0 = time.monotonic()
    stop_worker(proc, 0.5, requeue=calls.append)
    assert time.monotonic() - t0 < 10
    assert len(calls) == 1 and {proc.pid, child} <= calls[0]
    time.sleep(0.2)
    assert not _alive(child) and not process_tree(proc.pid)


def test_a_worker_that_stops_in_time_requeues_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.3)
    calls: list[set[int]] = []
    stop_worker(proc, 10, requeue=calls.append)
    assert calls == [] and proc.returncode is not None


def test_a_failing_requeue_does_not_stop_the_shutdown() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
        ]
    )
    time.sleep(0.3)

    def down(_: set[int]) -> None:
        raise ConnectionRefusedError("database down")

    assert stop_worker(proc, 0.3, requeue=down) == -9


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_scp_sigterm_lets_the_association_in_progress_finish(tmp_path: Path, processes: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {"LUSAI_DATA_DIR": str(tmp_path / "data"), "LUSAI_DICOM_PORT": str(port)}
    with open(tmp_path / "scp.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "scp", "--processes", str(processes)],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        first, second = cine("raw", frames=2, seed=1), cine("raw", frames=2, seed=2)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
        deadline = time.monotonic() + 60
        while not (assoc := ae.associate("127.0.0.1", port, ae_title="LUSAI")).is_established:
            assert time.monotonic() < deadline and proc.poll() is None, "SCP did not start"
            time.sleep(0.3)
        assert assoc.send_c_store(first).Status == 0
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the signal has arrived: no new association is accepted
        late = AE(ae_title="SCANNER")
        late.add_requested_context("1.2.840.10008.1.1")
        assert not late.associate("127.0.0.1", port, ae_title="LUSAI").is_established
        assert assoc.send_c_store(second).Status == 0  # the one in progress is still served
        assoc.release()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "lusai scp stopped" in (tmp_path / "scp.log").read_text()


@pytest.mark.slow
def test_api_sigterm_does_not_wait_for_a_slow_client_beyond_the_grace(tmp_path: Path) -> None:
    """uvicorn waited for every request in flight without limit: an upload trickling in held
    ``lusai api`` for as long as the client liked (54 s in the campaign), past a service manager's
    stop timeout. Now requests get LUSAI_SHUTDOWN_GRACE seconds, then they are cancelled."""
    import http.client

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {
        "LUSAI_DATA_DIR": str(tmp_path / "data"),
        "LUSAI_API_PORT": str(port),
        "LUSAI_SHUTDOWN_GRACE": "2",
    }
    with open(tmp_path / "api.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "api"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "API did not start"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health/live")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        key = subprocess.run(
            [sys.executable, "-m", "service", "apikey", "create", "t", "--scope", "write"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.putrequest("POST", "/api/v1/instances")
        for name, value in (
            ("X-API-Key", key),
            ("Content-Type", "application/dicom"),
            ("Content-Length", "9999999"),
        ):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(b"\0" * 4096)  # and then nothing more, for as long as it likes
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 2 + 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scp_children(pid: int) -> list[int]:
    """The SCP processes below ``pid`` (multiprocessing's resource tracker is not one)."""
    out = []
    for child in process_tree(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(child)
    return sorted(out)


@pytest.mark.slow
def test_scp_processes_exit_1_when_one_dies(tmp_path: Path) -> None:
    """A child SCP process that dies (OOM killer, a crash) stops the others and fails the command,
    so ``Restart=on-failure`` restarts it; it used to exit 0 and stay down."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {"LUSAI_DATA_DIR": str(tmp_path / "data"), "LUSAI_DICOM_PORT": str(free_port())}
    with open(tmp_path / "scp.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "scp", "--processes", "2"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        while len(children := _scp_children(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "children did not start"
            time.sleep(0.2)
        time.sleep(2)  # past their start-up
        os.kill(children[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        time.sleep(0.5)
        assert not [p for p in children if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
