"""The API's database reads, one module per resource; routes call them and shape the responses.

Each module holds its resource's statements, its sort orders (paged by
:func:`service.api.pagination.paginate`), its look-ups by key (404 when absent) and the mapping of
its rows to response bodies, which must agree with the columns the statements select.
"""

from __future__ import annotations

from typing import TypeVar

from service.api.problems import not_found

T = TypeVar("T")


def found(row: T | None, what: str) -> T:
    """``row``, or a 404 naming ``what`` when the look-up found nothing."""
    if row is None:
        raise not_found(what)
    return row
