"""The Celery application the workers run (``celery -A workers.celery_app worker``)."""

from __future__ import annotations

from celery import Celery

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
