"""The one error shape of the API: {"error": {"code": "<snake_case>", "message": "<human text>"}}."""

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


ECHO_CHARS = 64  # longest piece of a request that an error message quotes back
MESSAGE_CHARS = 1000  # longest error message, whatever it quotes


def echo(value) -> str:
    """A piece of the request, quoted for an error message: repr'd and cut to ECHO_CHARS."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + "..."


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str, **extra) -> dict:
    # Bounded, and valid UTF-8 even when it quotes undecodable bytes of a request.
    message = message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"code": code, "message": message, **extra}}


def describe_validation_errors(errors) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p)[:ECHO_CHARS] for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        return JSONResponse(error_body("invalid_request", describe_validation_errors(errors)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _store_unavailable(_: Request, exc: redis.RedisError):
        log.warning("job store unreachable: %s", exc)
        return JSONResponse(
            error_body("store_unavailable", "the job store (Redis) cannot be reached; try again shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
