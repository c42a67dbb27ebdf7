"""The console: the static web page under `/ui/` (files in `server/console/`, shipped in the wheel).

The files are open (the page asks for a key and sends it with every API call it makes); only
the files of that folder are served, read once, each with its content type. A strict content
security policy keeps the page to its own files: nothing is fetched from elsewhere.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.http.errors import APIError
from server.http.routing import ApiRoute, Operation

CONSOLE_PATH = "/ui/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css)$")
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidated, so an upgraded server never runs an old script
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
}


@cache
def console_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (content, content type) for every servable file of the console folder."""
    folder = resources.files("server").joinpath("console")
    files = {}
    for entry in folder.iterdir():
        if entry.is_file() and _NAME.match(entry.name):
            suffix = entry.name[entry.name.rindex("."):]
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


def console_routes() -> list[ApiRoute]:
    """`/ui` (a redirect), `/ui/` (the page) and `/ui/<file>`."""

    async def redirect(request: Request) -> Response:
        return RedirectResponse(CONSOLE_PATH, status_code=308)

    async def page(request: Request) -> Response:
        return _file("index.html")

    async def file(request: Request) -> Response:
        return _file(request.path_params["name"])

    pages = Operation("The web console", "Probes")  # a page, not an API: left out of the document
    return [
        ApiRoute("/ui", redirect, pages, methods=["GET"], documented=False),
        ApiRoute(CONSOLE_PATH, page, pages, methods=["GET"], documented=False),
        ApiRoute(CONSOLE_PATH + "{name}", file, pages, methods=["GET"], documented=False),
    ]


def _file(name: str) -> Response:
    found = console_files().get(name)
    if found is None:
        raise APIError(404, f"The console has no file `{name[:100]}`.", code="not_found")
    content, media_type = found
    return Response(content, media_type=media_type, headers=_HEADERS)
