"""`lusai` command line; each module below registers its commands on :data:`app`."""

from service.cli.app import app

# Command modules register themselves on import (one module per area).
from service.cli import db as _db  # noqa: E402,F401  (db upgrade/downgrade)
from service.cli import send as _send  # noqa: E402,F401  (send)
from service.cli import serve as _serve  # noqa: E402,F401  (serve, scp, api, worker)

__all__ = ["app", "main"]


def main() -> None:
    app()
