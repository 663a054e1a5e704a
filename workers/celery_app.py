"""The Celery application the workers run (``celery -A workers.celery_app worker``)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from service.logs import configure_logging
from service.queue import celery_config
from service.settings import get_settings


def create_app() -> Celery:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Celery("lusai", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Load the network when a pool process starts, so the first cine does not pay for it."""
    from workers.tasks import get_analyzer

    try:
        get_analyzer()
    except Exception:  # the task will try again and fail the job with the reason
        logging.getLogger(__name__).exception("model could not be loaded at worker start")
