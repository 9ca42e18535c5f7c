"""The web page: `GET /ui` and every `/ui/...` deep link answer the same single page; its files are
`/ui/assets/<name>`.

The page is static HTML, CSS and ES modules from `service/ui/` (no build step, nothing from a
CDN: factory networks are often offline) and talks only to the public REST API, so it shows what
any client sees. The files are read into a table once, by name; a request path is looked up in
that table and never reaches the file system, so no `..` can escape it. Serving the files needs
no key (they hold no data); every data call the page makes does.
"""

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from service.errors import ApiError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Scripts and connections only to this service. Images may also come from presigned S3 URLs,
# whose host is the deployment's; styles inline because the self-contained report.html opened
# from the page carries its own.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data: http: https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["ui"], include_in_schema=False)


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, media_type: str) -> "Asset":
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, gzip.compress(body, mtime=0), media_type, etag)

    def response(self, request: Request, headers: dict | None = None) -> Response:
        # No content-hashed file names without a build step, so browsers revalidate every load
        # (a 304 when nothing changed) and never run yesterday's script against today's API.
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding", **(headers or {})}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(self.gzipped, media_type=self.media_type, headers={**headers, "Content-Encoding": "gzip"})
        return Response(self.body, media_type=self.media_type, headers=headers)


@cache
def assets() -> dict[str, Asset]:
    """Every file under service/ui/assets, by its name relative to that folder."""
    folder = UI_DIR / "assets"
    return {
        path.relative_to(folder).as_posix(): Asset.of(path.read_bytes(), MEDIA_TYPES[path.suffix])
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


@cache
def page(auth: str) -> Asset:
    """index.html, told whether the API wants a key (so the page asks for one before calling it)
    and told to fetch every module at once rather than import by import."""
    preload = "\n".join(
        f'<link rel="modulepreload" href="/ui/assets/{name}">' for name in assets() if name.endswith(".js")
    )
    html = (UI_DIR / "index.html").read_text().replace("{{auth}}", auth).replace("{{modulepreload}}", preload)
    return Asset.of(html.encode(), MEDIA_TYPES[".html"])


def _not_found(path: str) -> ApiError:
    return ApiError(404, "not_found", f"no page or file /ui/{path[:200]}")


@router.get("/")
def root():
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
@router.get("/ui/{path:path}")
def ui(request: Request, path: str = ""):
    parts = path.split("/")
    if any(part in (".", "..") or "\\" in part for part in parts):
        raise _not_found(path)
    if parts[0] == "assets":
        asset = assets().get("/".join(parts[1:]))
        if asset is None:
            raise _not_found(path)
        return asset.response(request)
    auth = "bearer" if request.app.state.settings.auth_enabled else "loopback"
    return page(auth).response(request, PAGE_HEADERS)
