"""Run the service: ``serve`` (all parts, embedded defaults) or each part alone for production."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from typing import Annotated

import typer

from service.cli.app import app
from service.core.libraries import configure_libraries
from service.core.logs import configure_logging, ctx
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


def start_recovery(runtime: Runtime) -> threading.Event:
    """This process's recovery sweep: index spooled objects (receive), then the core's re-queues."""
    from service.core import recovery
    from service.receive.spool import drain_spool

    steps: list[recovery.Step] = [partial(drain_spool, runtime), *recovery.steps(runtime)]
    return recovery.start_background(steps, interval=runtime.settings.recovery_interval)


def run_scp(runtime: Runtime, *, with_recovery: bool = True) -> None:
    """Serve DICOM in this process until SIGTERM/SIGINT."""
    from service.receive.scp import make_server

    server = make_server(runtime)
    stop = start_recovery(runtime) if with_recovery else None
    try:
        server.serve_forever()
    finally:
        if stop is not None:
            stop.set()
        server.server_close()


def _scp_child(reserved: int) -> None:  # multiprocessing target; no recovery thread but in #0
    with Runtime.from_settings(_settings()) as runtime:
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
        _install_term_handler()
        with Runtime.from_settings(s) as runtime:
            run_scp(runtime)
        return
    ctx_ = multiprocessing.get_context("spawn")
    children = [ctx_.Process(target=_scp_child, args=(i,), daemon=True) for i in range(processes)]
    for c in children:
        c.start()
    _install_term_handler()
    try:
        while all(c.is_alive() for c in children):
            time.sleep(0.5)
    finally:
        for c in children:
            c.terminate()


@app.command()
def api() -> None:
    """Run the REST API alone (uvicorn)."""
    import uvicorn

    s = _settings()
    _upgrade_embedded(s)
    from service.api.main import create_app

    with Runtime.from_settings(s) as runtime:
        uvicorn.run(create_app(runtime), host=s.api_host, port=s.api_port, log_config=None, access_log=False)


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
        str(s.worker_concurrency),
        "--queues",
        queues,
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"lusai-{os.getpid()}@%h",
    ]
    if s.embedded_broker:
        argv.append("--without-heartbeat")
    return argv


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma list of queues: analyze (GPU/CPU), deliver (network).")
    ] = ("analyze,deliver"),
) -> None:
    """Run a Celery worker (prefetch 1, late acks) on the configured broker."""
    s = _settings()
    if "analyze" in queues.split(","):
        require_model_package(s)
    _upgrade_embedded(s)
    with Runtime.from_settings(s) as runtime:  # the recovery sweep's; the Celery worker builds its own
        start_recovery(runtime)
        proc = subprocess.Popen(worker_argv(s, queues), preexec_fn=_die_with_parent)
        _forward_signals(proc)
        code = proc.wait()
    sys.exit(code)


@app.command()
def serve() -> None:
    """Run SCP, REST API and a Celery worker together on embedded defaults (no server needed)."""
    s = _settings()
    require_model_package(s)
    _upgrade_embedded(s)
    import uvicorn

    from service.api.main import create_app

    # uvicorn re-raises SIGTERM after its shutdown, which ends this process before any `finally`
    # runs: the kernel must stop the worker when we go, or it lives on as an orphan.
    worker_proc = subprocess.Popen(worker_argv(s, "analyze,deliver"), preexec_fn=_die_with_parent)
    runtime = Runtime.from_settings(s)  # one for the SCP thread and the API (the worker builds its own)
    scp_thread = threading.Thread(target=run_scp, args=(runtime,), name="lusai-scp", daemon=True)
    scp_thread.start()
    log.info(
        "lusai serving",
        extra=ctx(
            dicom_port=s.dicom_port,
            api_port=s.api_port,
            data_dir=str(s.data_dir),
            broker="embedded" if s.embedded_broker else "external",
        ),
    )
    try:
        uvicorn.run(create_app(runtime), host=s.api_host, port=s.api_port, log_config=None, access_log=False)
    finally:
        worker_proc.terminate()
        try:
            worker_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker_proc.kill()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent exits (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _install_term_handler() -> None:
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _forward_signals(proc: subprocess.Popen[bytes]) -> None:
    def _forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _forward)
