"""`Idempotency-Key` on the POSTs that create something, as Stripe does it.

The first request with a key claims it, runs, and stores its response for 24 h. A later request
with the same key and the same content gets that response again (same status and body, header
`Idempotent-Replayed: true`) and creates nothing; with other content it is a 409
`idempotency_key_reused`, and while the first one is still running a 409 `idempotency_key_in_use`.
A request that fails releases its key, so the client may retry it under the same key. Keys are
per tenant.

"The same content" is a fingerprint of the route and of what the request says (the parsed JSON
body; the form fields and each file's SHA-256), not of its raw bytes: a retried multipart upload
has a new boundary but is the same request.
"""

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Header, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.errors import ApiError
from service.records import Records

# How long a request in progress holds its key: longer than the slowest create (a 2 GiB dataset
# checked file by file), short enough that a key whose API process died is free again soon.
CLAIM_SECONDS = 600
CHUNK = 1 << 20

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="any unique string (a UUID): a retry with the same key returns the first response and "
        "creates nothing (24 h, per tenant)",
    ),
]


def fingerprint(route: str, content) -> str:
    """The request's content (a model, or JSON-able parts) as a digest, the same for any key order."""
    try:
        if isinstance(content, BaseModel):
            content = content.model_dump(mode="json")
        canonical = json.dumps([route, content], sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # nested deeper than serialisers go: no request this API takes
        raise ApiError(422, "invalid_request", "the request is nested too deeply") from None
    return hashlib.sha256(canonical.encode()).hexdigest()


async def file_digest(upload: UploadFile | None) -> str | None:
    """SHA-256 of an uploaded file, read in chunks and rewound for the route to read again."""
    if upload is None:
        return None
    digest = hashlib.sha256()
    while chunk := await upload.read(CHUNK):
        digest.update(chunk)
    await upload.seek(0)
    return digest.hexdigest()


def run_once(
    records: Records,
    tenant: str,
    key: str | None,
    request_fingerprint: str | None,
    status_code: int,
    response_model: type[BaseModel],
    create: Callable[[], dict],
):
    """The response body of `create()`, or, for a key this tenant used before, the stored response.
    `request_fingerprint` is needed only with a key (routes compute it only then)."""
    if key is None:
        return create()
    claim = {"fingerprint": request_fingerprint, "claim": secrets.token_hex(8)}
    stored = records.claim_idempotency_key(tenant, key, claim, CLAIM_SECONDS)
    if stored is not None:
        if stored["fingerprint"] != request_fingerprint:
            raise ApiError(
                409, "idempotency_key_reused", "this Idempotency-Key was used for a different request; use a new key"
            )
        if "body" not in stored:
            raise ApiError(
                409, "idempotency_key_in_use", "a request with this Idempotency-Key is still running; retry shortly"
            )
        return JSONResponse(stored["body"], status_code=stored["status"], headers={"Idempotent-Replayed": "true"})
    try:
        body = response_model.model_validate(create()).model_dump(mode="json")
    except BaseException:
        records.release_idempotency_key(tenant, key, claim)
        raise
    records.save_idempotency_key(tenant, key, {"fingerprint": request_fingerprint, "status": status_code, "body": body})
    return body
