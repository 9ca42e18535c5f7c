"""Cursor pagination of every list, as the GitHub and Stripe APIs do it: `limit` and `cursor` in,
`next_cursor` out (null on the last page). See Records.page for why a cursor is stable while
records come and go."""

import base64
from typing import Annotated

from fastapi import Query

from service.errors import ApiError
from service.records import InvalidCursor, Records

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"items per page, at most {MAX_LIMIT}")]
Cursor = Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page")]


def _invalid(exc: Exception) -> ApiError:
    return ApiError(422, "invalid_cursor", str(exc))


def page(records: Records, kind: str, tenant: str, filters: dict, limit: int, cursor: str | None):
    """(records of one page, next_cursor), or a 422 `invalid_cursor`."""
    try:
        return records.page(kind, tenant, filters, limit, cursor)
    except InvalidCursor as exc:
        raise _invalid(exc) from None


def encode_key_cursor(key: str) -> str:
    """The cursor after a storage key (artifact listings are in key order)."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_key_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        raise _invalid(InvalidCursor("the cursor is not one this API returned")) from None
