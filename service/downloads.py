"""Serving a stored object through the API: from disk as a file, from S3 streamed chunk by chunk
(never read whole into memory), for callers that cannot reach the storage themselves."""

import mimetypes

from fastapi.responses import FileResponse, Response, StreamingResponse

from service.errors import ApiError
from service.storage import LocalStorage


def download(storage, key: str, filename: str | None = None) -> Response:
    if not storage.exists(key):  # checked first: a stream cannot turn into a 404 once it has started
        raise ApiError(404, "object_not_found", f"{filename or key} is not in storage")
    media_type = mimetypes.guess_type(filename or key)[0] or "application/octet-stream"
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.local_path(key), media_type=media_type, filename=filename)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else None
    return StreamingResponse(storage.stream(key), media_type=media_type, headers=headers)
