"""`lusai serve` on embedded defaults, as a user starts it: DICOM, API and real Celery workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from service.cli.check import c_echo
from service.cli.serve import process_tree
from tests.conftest import free_port, stop, storescu
from tests.factories import phantom_cine_file

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    dicom_port, api_port = free_port(), free_port()
    env |= {
        "LUSAI_DATA_DIR": str(tmp_path / "data"),
        "LUSAI_DICOM_PORT": str(dicom_port),
        "LUSAI_API_PORT": str(api_port),
        "LUSAI_LOG_FORMAT": "json",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (the child keeps writing to it)
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log)
    try:
        yield {
            "proc": proc,
            "dicom_port": dicom_port,
            "api_port": api_port,
            "data": tmp_path / "data",
            "log": tmp_path / "serve.log",
        }
    finally:
        stop(proc)
        log.close()


def _wait_ready(served: dict[str, object], deadline_s: float) -> float:
    t0 = time.monotonic()
    echo_ok = health_ok = False
    while time.monotonic() - t0 < deadline_s:
        proc = served["proc"]
        assert isinstance(proc, subprocess.Popen)
        assert proc.poll() is None, Path(str(served["log"])).read_text()[-3000:]
        port = int(str(served["dicom_port"]))
        echo_ok = echo_ok or c_echo("127.0.0.1", port, "LUSAI", calling_ae="TESTSCU")
        if not health_ok:
            try:
                r = httpx.get(f"http://127.0.0.1:{served['api_port']}/health", timeout=2)
                health_ok = r.status_code == 200 and r.json()["status"] == "ok"
            except httpx.HTTPError:
                pass
        if echo_ok and health_ok:
            return time.monotonic() - t0
        time.sleep(0.25)
    log = Path(str(served["log"])).read_text()[-4000:]
    raise AssertionError(f"not ready in {deadline_s}s: echo={echo_ok} health={health_ok}\n{log}")


def test_serve_answers_echo_and_health_within_20s(served: dict[str, object]) -> None:
    _wait_ready(served, 20.0)


def test_stopping_serve_stops_its_worker(served: dict[str, object]) -> None:
    """SIGTERM to `lusai serve` (systemd stop, docker stop) leaves no orphaned Celery worker."""
    _wait_ready(served, 20.0)
    proc = served["proc"]
    assert isinstance(proc, subprocess.Popen)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "serve runs its worker as a child process"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [c for c in alive if Path(f"/proc/{c}").exists() and "Z" not in _state(c)]
        time.sleep(0.2)
    assert not alive, f"worker processes outlived serve: {alive}"


@pytest.mark.parametrize("when", ["while importing", "while the worker starts", "when running"])
def test_sigterm_at_any_moment_leaves_no_process_behind(tmp_path: Path, when: str) -> None:
    """A service manager stops the process group at any moment, even in a crash loop's first
    seconds: `lusai serve` exits only after every process it started is gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {
        "LUSAI_DATA_DIR": str(tmp_path / "data"),
        "LUSAI_DICOM_PORT": str(free_port()),
        "LUSAI_API_PORT": str(free_port()),
        "LUSAI_SHUTDOWN_GRACE": "10",
    }
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            if when == "while importing":
                time.sleep(0.5)
            elif when == "while the worker starts":
                deadline = time.monotonic() + 30
                while not process_tree(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert process_tree(proc.pid), "the worker never started"
            else:  # SCP and API answer, and the worker runs its pool (which loads the model)
                ports = {"dicom_port": env["LUSAI_DICOM_PORT"], "api_port": env["LUSAI_API_PORT"]}
                _wait_ready({"proc": proc, "log": tmp_path / "serve.log", **ports}, 30.0)
                deadline = time.monotonic() + 30
                while len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
            seen = process_tree(proc.pid)
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= process_tree(proc.pid)  # whatever it starts while stopping counts too
                time.sleep(0.05)
            assert proc.poll() is not None, "serve did not stop within 40 s"
            left = [pid for pid in seen if _state(str(pid)) != "Z"]
            assert not left, f"processes outlived serve ({when}): {left}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("queue", ["analyze", "deliver"])
def test_a_worker_that_dies_stops_serve_with_exit_1(served: dict[str, object], queue: str) -> None:
    """An analyze or deliver worker killed (OOM killer, kill -9) would leave jobs nobody takes:
    `lusai serve` stops everything it started and exits 1, so the service manager restarts it."""
    _wait_ready(served, 20.0)
    proc = served["proc"]
    assert isinstance(proc, subprocess.Popen)
    workers = [
        int(pid)
        for pid in subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    target = next(
        pid for pid in workers if f"--queues\0{queue}\0" in Path(f"/proc/{pid}/cmdline").read_text()
    )
    seen = process_tree(proc.pid)
    os.kill(target, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1, Path(str(served["log"])).read_text()[-3000:]
    assert "a worker process exited" in Path(str(served["log"])).read_text()
    deadline = time.monotonic() + 30
    left = seen
    while left and time.monotonic() < deadline:
        left = {pid for pid in left if _state(str(pid)) != "Z"}
        time.sleep(0.2)
    assert not left, f"processes outlived serve: {left}"


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_serve_analyses_a_cine_end_to_end(served: dict[str, object], tmp_path: Path) -> None:
    """C-STORE with DCMTK storescu -> rows -> real Celery worker on the embedded queue -> result."""
    _wait_ready(served, 20.0)
    cine = phantom_cine_file(tmp_path / "cine.dcm", frames=10, jpeg=True)
    out = storescu(int(str(served["dicom_port"])), cine, "LUSAI")
    assert out.returncode == 0, out.stderr
    engine = create_engine(f"sqlite:///{served['data']}/lusai.sqlite")
    state = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with engine.connect() as c:
            row = c.execute(text("SELECT state, error FROM jobs")).first()
        state = row[0] if row else None
        if state in ("succeeded", "failed"):
            break
        time.sleep(1)
    assert state == "succeeded", (row, Path(str(served["log"])).read_text()[-4000:])
    with engine.connect() as c:
        res = c.execute(
            text("SELECT score, seg_storage_key, sr_storage_key, model_version FROM results")
        ).one()
    engine.dispose()
    assert res[0] in (0, 1, 2, 3)
    for key in res[1:3]:
        assert (Path(str(served["data"])) / "storage" / key).is_file()
    log_text = Path(str(served["log"])).read_text()
    assert "PHANTOM-1" not in log_text and "TEST^PHANTOM" not in log_text  # no PHI in logs


def test_an_scp_that_cannot_start_stops_serve_with_exit_1(tmp_path: Path) -> None:
    """The DICOM port taken by another program: the SCP thread ends at start. `lusai serve` used
    to go on serving the API with no SCP (a scanner's sends refused, /health green); it now stops
    everything and exits 1, and the log says why."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env |= {
            "LUSAI_DATA_DIR": str(tmp_path / "data"),
            "LUSAI_DICOM_PORT": str(taken.getsockname()[1]),
            "LUSAI_API_PORT": str(free_port()),
            "LUSAI_LOG_FORMAT": "json",
        }
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log
            )
            try:
                code = proc.wait(timeout=90)
            finally:
                stop(proc)
    text = (tmp_path / "serve.log").read_text()
    assert code == 1, text[-3000:]
    assert "the SCP thread ended" in text
