"""Run the service: ``serve`` (all parts, embedded defaults) or each part alone for production."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from service.cli import stopping
from service.cli.app import app
from service.core.libraries import configure_libraries
from service.core.logs import configure_logging, ctx
from service.core.queue import ANALYZE_QUEUES
from service.core.recovery import requeue_jobs_of
from service.core.runtime import Runtime
from service.core.settings import Settings

log = logging.getLogger("lusai.cli")


def _settings() -> Settings:
    """Start-up of every long-running command (and of each ``scp --processes`` child): the one
    place these processes read the environment; their runtime is built from what this returns."""
    s = Settings()
    configure_logging(s.log_format, s.log_level)
    configure_libraries()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return s


def _upgrade_embedded(s: Settings) -> None:
    """Embedded SQLite is migrated on start; production runs ``lusai db upgrade`` as a release step."""
    if s.db_url.startswith("sqlite"):
        from migrations.runner import upgrade

        upgrade(s.db_url)


def require_model_package(s: Settings) -> None:
    """Verify LUSAI_MODEL_PATH before a worker starts: a bad package stops it with one clear line
    and exit code 1, rather than a worker that fails every job or a restart loop of tracebacks."""
    from service.core.model_package import DEFAULT_PACKAGE, PackageError, load_package

    try:
        pkg = load_package(s.model_path or DEFAULT_PACKAGE)
    except PackageError as exc:
        log.error("worker not started: bad model package (LUSAI_MODEL_PATH)", extra=ctx(error=str(exc)))
        raise typer.Exit(code=1) from None
    log.info(
        "model package verified",
        extra=ctx(model=pkg.name, version=pkg.version, package_sha256=pkg.package_sha256),
    )


def start_recovery(runtime: Runtime, *, probe: bool = False) -> threading.Event:
    """This process's recovery sweep: index spooled objects (receive), then the core's re-queues,
    and with ``probe`` (a process that delivers) a C-ECHO to destinations waiting for a retry."""
    from service.core import recovery
    from service.receive.spool import drain_spool

    steps: list[recovery.Step] = [partial(drain_spool, runtime), *recovery.steps(runtime)]
    if probe:  # last: a destination that does not answer costs the sweep a connect timeout
        from workers.deliver import probe_destinations

        steps.append(partial(probe_destinations, runtime))
    return recovery.start_background(steps, interval=runtime.settings.recovery_interval)


def run_api(runtime: Runtime) -> None:
    """Serve the REST API in this process until SIGTERM/SIGINT (uvicorn handles the signal)."""
    import uvicorn

    from service.api.main import create_app

    s = runtime.settings
    uvicorn.run(
        create_app(runtime),
        host=s.api_host,
        port=s.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(s.shutdown_grace),  # a slow client cannot hold the stop
    )


def run_scp(runtime: Runtime, *, with_recovery: bool = True, probe: bool = False) -> None:
    """Serve DICOM in this process until SIGTERM/SIGINT."""
    from service.receive.scp import make_server

    server = make_server(runtime)
    stop = start_recovery(runtime, probe=probe) if with_recovery else None
    try:
        server.serve_forever()
    finally:
        if threading.current_thread() is threading.main_thread():  # the scp commands, not serve's thread
            stopping.acknowledge()
        if stop is not None:
            stop.set()
        server.server_close()


def _scp_child(reserved: int) -> None:  # multiprocessing target; no recovery thread but in #0
    stopping.install(once=True)  # the parent's SIGTERM: stop accepting, let associations finish
    with contextlib.suppress(KeyboardInterrupt), Runtime.from_settings(_settings()) as runtime:
        run_scp(runtime, with_recovery=reserved == 0)


@app.command()
def scp(
    processes: Annotated[
        int,
        typer.Option(help="SCP processes sharing the port (SO_REUSEPORT); >1 for many concurrent senders."),
    ] = 1,
) -> None:
    """Run the DICOM C-STORE SCP alone."""
    s = _settings()
    _upgrade_embedded(s)
    if processes <= 1:
        stopping.install(once=True)
        with contextlib.suppress(KeyboardInterrupt), Runtime.from_settings(s) as runtime:
            run_scp(runtime)  # SIGTERM: no new associations; those in progress finish first
        log.info("lusai scp stopped")
        return
    ctx_ = multiprocessing.get_context("spawn")
    children = [ctx_.Process(target=_scp_child, args=(i,), daemon=True) for i in range(processes)]
    for c in children:
        c.start()
    stopping.install(once=True)
    stopped = False
    try:
        while all(c.is_alive() for c in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopping.acknowledge()
        stopped = True
    finally:
        for c in children:  # each drains its associations like a single SCP process, then exits
            c.terminate()
        deadline = time.monotonic() + s.shutdown_grace
        for c in children:
            c.join(max(0.0, deadline - time.monotonic()))
            if c.is_alive():
                c.kill()
                c.join()
    if not stopped:  # a process died under us: fail, so the service manager restarts us
        log.error("an SCP process exited: all stopped", extra=ctx(exit_codes=[c.exitcode for c in children]))
        raise typer.Exit(code=1)
    log.info("lusai scp stopped")


@app.command()
def api() -> None:
    """Run the REST API alone (uvicorn)."""
    s = _settings()
    _upgrade_embedded(s)
    with Runtime.from_settings(s) as runtime:
        run_api(runtime)


def worker_argv(s: Settings, queues: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--loglevel",
        s.log_level,
        "--concurrency",
        str(s.worker_concurrency if _analyses(queues) else s.deliver_concurrency),
        "--queues",
        queues,
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"lusai-{os.getpid()}-{queues.replace(',', '-')}@%h",
    ]
    if s.embedded_broker:
        argv.append("--without-heartbeat")
    return argv


def _analyses(queues: str) -> bool:
    """Whether a worker on these queues runs the model (analyze, analyze.gpu, analyze.cpu)."""
    return any(q.strip() in ANALYZE_QUEUES for q in queues.split(","))


@app.command()
def worker(
    queues: Annotated[
        str,
        typer.Option(
            help="Comma list of queues: analyze (plus analyze.gpu or analyze.cpu, after the device found),"
            " deliver (network, then previews). Name analyze.gpu or analyze.cpu to choose yourself."
        ),
    ] = ("analyze,deliver"),
) -> None:
    """Run a Celery worker (prefetch 1, late acks) on the configured broker; it registers in the
    worker registry and heartbeats every LUSAI_HEARTBEAT_INTERVAL."""
    stopping.install()  # first: a SIGTERM at any moment takes the way out below
    s = _settings()
    if _analyses(queues):
        require_model_package(s)
    _upgrade_embedded(s)
    with Runtime.from_settings(s) as runtime:  # the recovery sweep's; the Celery worker builds its own
        start_recovery(runtime, probe="deliver" in queues.split(","))
        proc = start_worker(s, queues)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stopping.acknowledge()
            code = stop_worker(proc, s.shutdown_grace, requeue=partial(requeue_jobs_of, runtime))
    sys.exit(code)


@app.command()
def serve() -> None:
    """Run SCP, REST API and two Celery workers together on embedded defaults (no server needed).

    One worker analyses, the other delivers (then audits and renders previews): the deliveries,
    audit and previews of one cine never hold up the analysis of the next, and the second core
    is used. The deliver worker loads no model."""
    stopping.install()  # first: a SIGTERM at any moment, even while starting, stops everything
    s = _settings()
    require_model_package(s)
    _upgrade_embedded(s)
    worker_procs: list[subprocess.Popen[bytes]] = []
    runtime: Runtime | None = None
    died = threading.Event()
    try:
        for queues in ("analyze", "deliver"):
            worker_procs.append(start_worker(s, queues))
        runtime = Runtime.from_settings(s)  # one for the SCP thread and the API (the workers build their own)
        _import_both_sides()
        scp_thread = threading.Thread(
            target=run_scp, args=(runtime,), kwargs={"probe": True}, name="lusai-scp", daemon=True
        )
        scp_thread.start()
        threading.Thread(
            target=_watch_workers, args=(worker_procs, died, scp_thread), name="lusai-watch", daemon=True
        ).start()
        log.info(
            "lusai serving",
            extra=ctx(
                dicom_port=s.dicom_port,
                api_port=s.api_port,
                data_dir=str(s.data_dir),
                broker="embedded" if s.embedded_broker else "external",
            ),
        )
        # uvicorn handles SIGTERM itself, then raises it again once it has shut down: the handler
        # installed above turns that into KeyboardInterrupt, so the workers are stopped below.
        if not stopping.requested():  # a SIGTERM lost in a finalizer while starting: do not serve
            run_api(runtime)
    except KeyboardInterrupt:
        pass
    finally:
        stopping.acknowledge()
        requeue = partial(requeue_jobs_of, runtime) if runtime is not None else None
        stop_workers(worker_procs, s.shutdown_grace, requeue=requeue)
    if died.is_set():  # fail, so the service manager restarts all of it
        log.error("lusai stopped: a worker process or the SCP thread ended")
        raise typer.Exit(code=1)
    log.info("lusai stopped")


def _import_both_sides() -> None:
    """Import what the SCP thread and the API import, here, before either starts.

    CPython 3.11.7's AST validator keeps its recursion depth in shared state: two threads
    compiling at once (anyio compiles its own source when imported) can fail one of them with
    "SystemError: AST constructor recursion depth mismatch" (gh-106905). Seen as `lusai serve`
    exiting at start, or serving the API with its SCP thread dead, about once in 25 starts.
    """
    import uvicorn  # noqa: F401

    from service.api.main import create_app  # noqa: F401
    from service.receive.scp import make_server  # noqa: F401


def _watch_workers(
    procs: list[subprocess.Popen[bytes]], died: threading.Event, scp: threading.Thread | None = None
) -> None:
    """A worker that exits on its own (killed, out of memory) leaves jobs that nobody takes, and an
    SCP thread that ended takes no more objects: stop the whole service (SIGTERM to ourselves, the
    way every stop goes) and exit 1, so the service manager starts it again."""
    while not stopping.requested():
        if any(p.poll() is not None for p in procs):
            log.error(
                "a worker process exited: stopping",
                extra=ctx(exit_codes=[p.returncode for p in procs]),
            )
            died.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if scp is not None and not scp.is_alive() and not stopping.requested():
            log.error("the SCP thread ended: stopping")
            died.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(1.0)


def stop_workers(
    procs: list[subprocess.Popen[bytes]], grace_s: float, requeue: Callable[[set[int]], object] | None
) -> None:
    """Stop several workers within one grace period: all are told at once, then each is waited
    for (and killed) by :func:`stop_worker` with what is left of it."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        stop_worker(proc, max(0.0, deadline - time.monotonic()), requeue=requeue)


def start_worker(s: Settings, queues: str) -> subprocess.Popen[bytes]:
    """The Celery worker as our child, in our process group (a kill of the group takes it too).
    Should we be killed, the kernel sends it SIGTERM (PR_SET_PDEATHSIG)."""
    return subprocess.Popen(worker_argv(s, queues), preexec_fn=_die_with_parent)


def stop_worker(
    proc: subprocess.Popen[bytes],
    grace_s: float,
    requeue: Callable[[set[int]], object] | None = None,
) -> int:
    """Stop the worker before we exit, so nothing outlives us: SIGTERM (Celery's warm shutdown lets
    the job in hand finish), then SIGKILL to it and every process it started after ``grace_s``. A
    job killed mid-way is not lost: ``requeue`` is given the killed processes' IDs and puts the
    jobs they held back on the queue (the embedded broker has consumed their message; Redis would
    redeliver it only after its visibility timeout). Returns the worker's exit code."""
    tree = process_tree(proc.pid)  # its pool processes; once it exits they are no longer its children
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # out of time, or told to stop again
        log.warning("worker killed: it did not stop in time", extra=ctx(grace_s=grace_s))
        code = None
    killed = {proc.pid} if code is None else set()
    for pid in sorted(tree | process_tree(proc.pid)):  # pool processes it left behind, if any
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    if code is None:
        proc.kill()
        code = proc.wait()
    if killed and requeue is not None:
        try:
            requeue(killed | tree)
        except Exception as exc:  # database down: the recovery sweep re-queues them later
            log.error("could not re-queue the killed worker's jobs", extra=ctx(error=type(exc).__name__))
    return code


def process_tree(root: int) -> set[int]:
    """The processes below ``root`` (Linux /proc; empty elsewhere). Also what the shutdown tests and
    the chaos campaign observe."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent exits (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
