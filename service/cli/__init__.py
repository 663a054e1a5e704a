"""`lusai` command line; each module below registers its commands on :data:`app`."""

# Command modules register themselves on import (one module per area).
from service.cli import adapt as _adapt  # noqa: F401  (adapt)
from service.cli import apikey as _apikey  # noqa: F401  (apikey create/list/revoke)
from service.cli import check as _check  # noqa: F401  (check, echo)
from service.cli import db as _db  # noqa: F401  (db upgrade/downgrade)
from service.cli import deliveries as _deliveries  # noqa: F401  (deliveries list/resend)
from service.cli import model as _model  # noqa: F401
from service.cli import reviews as _reviews  # noqa: F401  (reviews export/list)
from service.cli import send as _send  # noqa: F401  (send)
from service.cli import serve as _serve  # noqa: F401  (serve, scp, api, worker)
from service.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
