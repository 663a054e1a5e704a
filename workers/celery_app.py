"""The Celery application the workers run (``celery -A workers.celery_app worker``)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from service.core.logs import configure_logging
from service.core.queue import ANALYZE_QUEUE, celery_config
from service.core.settings import get_settings


def create_app() -> Celery:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Celery("lusai", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()
_analyzes = True  # does this worker consume the analyze queue (set before the pool forks)?


@worker_init.connect
def _verify_model_package(sender: Any = None, **_: Any) -> None:
    """Refuse to start, in the main process before any pool process, on a bad model package.

    One clear log line and exit code 1, instead of pool processes that fail every job (or a restart
    loop of tracebacks). ``lusai worker`` checks the same before it starts Celery at all.
    """
    from workers.infer.package import DEFAULT_PACKAGE, PackageError, load_package

    global _analyzes
    queues = sender.app.amqp.queues if sender is not None else {ANALYZE_QUEUE: None}
    _analyzes = ANALYZE_QUEUE in (getattr(queues, "consume_from", None) or queues)
    if not _analyzes:  # a deliver-only worker needs no model
        return
    try:
        pkg = load_package(get_settings().model_path or DEFAULT_PACKAGE)
    except PackageError as exc:
        logging.getLogger(__name__).error("worker not started: bad model package (LUSAI_MODEL_PATH): %s", exc)
        raise SystemExit(1) from None
    logging.getLogger(__name__).info(
        "model package %s %s verified (package %s)", pkg.name, pkg.version, pkg.package_sha256[:12]
    )


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Load the network when a pool process starts, so the first cine does not pay for it."""
    from workers.tasks import get_analyzer

    if not _analyzes:
        return
    try:
        get_analyzer()
    except Exception:  # the task will try again and fail the job with the reason
        logging.getLogger(__name__).exception("model could not be loaded at worker start")
