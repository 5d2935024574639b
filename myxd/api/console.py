"""The web console's static files: a single page (HTML, CSS, JS modules) served by the daemon.

`Console` is a small Klein app that AdminAPI mounts at `GET /` (the page) and under
`/console/` (its assets). These are the only routes the token gate lets through
without the admin token (`PUBLIC_PATHS`): they hold no data, and the page itself asks
the operator for the token and sends it on every API call.

The files come from an explicit allowlist and are read once, when the app is built,
so a request can never name a file on disk. The script is a tree of ES modules
(`app.js` imports the others, views under `views/`, third-party code under
`vendor/`), loaded by the browser with no build step: each module a page imports
must be listed in `MODULES`, or the browser gets a 404 for it. Responses carry a strict
Content-Security-Policy (no inline script, nothing from another origin), nosniff, and
an ETag so a browser revalidates instead of using a stale console after an upgrade.
This module never serves anything but those files, and never reads a request body.
Errors are answered by the shared error map (`errormap`).
"""

# test-case-name: tests.daemon.test_console

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from myxd.api import errormap
from myxd.errors import NotFoundError

__all__ = ["ASSETS", "CONSOLE_PREFIX", "MODULES", "Console", "PUBLIC_PATHS", "SECURITY_HEADERS"]

#: Where the assets are mounted (the page links to them relative to "/").
CONSOLE_PREFIX = "/console/"

_JS = "text/javascript; charset=utf-8"

#: The console's ES modules, relative to static/ (see app.js for what each is for).
MODULES: tuple[str, ...] = (
    "app.js",
    "api.js",
    "dom.js",
    "format.js",
    "forms.js",
    "login.js",
    "names.js",
    "router.js",
    "routes.js",
    "term.js",
    "upload.js",
    "view.js",
    "views/agent.js",
    "views/command.js",
    "views/commands.js",
    "views/deploy-vars.js",
    "views/deployment.js",
    "views/deployments.js",
    "views/events.js",
    "views/fleet.js",
    "views/run-results.js",
    "views/run.js",
    "views/server-form.js",
    "views/server.js",
    "views/servers.js",
    # Third-party, unmodified, licence beside it (see vendor/README.md).
    "vendor/ansi_up.js",
)

#: name under /console/ -> content type
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
    # Module scripts need a JavaScript MIME type (the browser refuses anything else
    # under nosniff); text/javascript is the one the HTML standard names.
    **{name: _JS for name in MODULES},
}

#: Exact request paths the token gate serves without the admin token (GET/HEAD only).
PUBLIC_PATHS: tuple[bytes, ...] = (b"/",) + tuple(
    (CONSOLE_PREFIX + name).encode("ascii") for name in ASSETS if name != "index.html"
)

SECURITY_HEADERS: dict[bytes, bytes] = {
    # default-src 'self' forbids inline script and any other origin; the rest stops
    # the console being framed (clickjacking) or a <base> tag redirecting its URLs.
    b"content-security-policy": (
        b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}

# The page and its assets change only with the daemon: a browser may keep them, but
# must revalidate (cheap, 304 by ETag) so an upgraded daemon never runs an old page.
_CACHE_CONTROL = b"no-cache"

# A tiny favicon, so the browser's automatic /favicon request is not a 401 every time.
_ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="6" fill="#1f6feb"/>'
    b'<path d="M7 24V8h4l5 8 5-8h4v16h-4V15l-5 8-5-8v9z" fill="#fff"/></svg>'
)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: bytes
    etag: bytes


def _load(package: str, name: str) -> bytes:
    if name == "icon.svg":
        return _ICON
    return resources.files(package).joinpath("static", name).read_bytes()


class Console:
    """Serves the console's allowlisted files; `resource()` is mounted by AdminAPI."""

    _app = Klein()
    log = Logger()
    errormap.install(_app, log, "web console")

    def __init__(self, package: str = "myxd.api") -> None:
        self._assets: dict[str, _Asset] = {}
        for name, content_type in ASSETS.items():
            body = _load(package, name)
            digest = hashlib.sha256(body).hexdigest()[:32]
            self._assets[name] = _Asset(
                body, content_type.encode("ascii"), f'"{digest}"'.encode("ascii")
            )

    def resource(self) -> IResource:
        return self._app.resource()

    def _serve(self, request: IRequest, name: str) -> bytes:
        asset = self._assets.get(name)
        if asset is None:
            raise NotFoundError("no such console file")
        for header, value in SECURITY_HEADERS.items():
            request.setHeader(header, value)
        request.setHeader(b"cache-control", _CACHE_CONTROL)
        request.setHeader(b"etag", asset.etag)
        request.setHeader(b"content-type", asset.content_type)
        given = request.getHeader(b"if-none-match")
        if given is not None:
            tags = {
                t.strip()
                for t in (given if isinstance(given, bytes) else given.encode("latin-1")).split(
                    b","
                )
            }
            if asset.etag in tags or b"*" in tags:
                request.setResponseCode(304)
                return b""
        # For HEAD, twisted.web sends the headers (content-length included) but no body.
        return asset.body

    @_app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return self._serve(request, "index.html")

    # `path` (not `string`) so "views/fleet.js" reaches the allowlist lookup; a name
    # not in it, "../x" included, is a 404 and never touches the disk.
    @_app.route("/<path:name>", methods=["GET"])
    def asset(self, request: IRequest, name: str) -> bytes:
        return self._serve(request, name)
