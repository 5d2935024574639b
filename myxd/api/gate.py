"""The front door of the admin API: request ids, the admin token, the body cap.

Every request passes through `Gate` before any route runs, so no route can forget
the token check: only the explicit `public` allowlist (GET/HEAD of exact paths) is
served without it. `BoundedRequest` stops buffering a request body past the cap while
it is still arriving, so an unauthenticated client cannot make the daemon spool an
arbitrarily large body to disk.

Nothing here logs a token or a request body.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from myxd.api.auth import is_authorized
from myxd.api.deadlines import IDLE_TIMEOUT, DeadlineChannel
from myxd.api.inputs import MAX_BODY_BYTES, APIError, json_bytes

__all__ = ["BoundedRequest", "Gate", "make_site", "request_id"]

_REQUEST_ID_ATTR = "_myx_request_id"


def request_id(request: IRequest) -> str:
    """The id the gate gave this request (also sent back as X-Request-Id)."""
    return str(getattr(request, _REQUEST_ID_ATTR, "-"))


class BoundedRequest(Request):
    """A Request that keeps at most `max_body` bytes of the body and flags the rest.

    One exception, decided when the headers are in and before any body byte is
    kept: an upload to a path of the site's `large_bodies` (``POST
    /api/artifacts``) that carries the right admin token may be as large as that
    path's limit. Twisted spools such a body to a temporary file, never to
    memory. A client without the token keeps the small cap, so it cannot make
    the daemon spool a large body.
    """

    max_body = MAX_BODY_BYTES
    body_too_large = False

    def _limit(self) -> int:
        channel = self.channel
        site = getattr(channel, "site", None)
        large: dict[bytes, int] = getattr(site, "large_bodies", None) or {}
        token: bytes = getattr(site, "admin_token", b"")
        # The request line is parsed by now (the channel keeps it) but the
        # Request's own method and path are set only after the body arrived.
        command = getattr(channel, "_command", b"")
        path = (getattr(channel, "_path", b"") or b"").split(b"?", 1)[0]
        limit = large.get(path) if command == b"POST" else None
        # Only a raw body: Twisted would parse a form body in memory.
        kind = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
        raw = kind.split(b";")[0].strip().lower() in (b"", b"application/octet-stream")
        if limit is not None and raw and token and is_authorized(self, token):
            return limit
        return self.max_body

    def gotLength(self, length: int | None) -> None:
        self._body_seen = 0
        self.max_body = self._limit()
        if length is not None and length > self.max_body:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            # Chunked bodies have no length up front: drop what we kept and stop.
            self.body_too_large = True
            if self.content is not None:
                self.content.close()
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


def _body_too_large(request: IRequest, max_body: int) -> bool:
    if getattr(request, "body_too_large", False):
        return True
    # A request that was allowed a larger body (see BoundedRequest) was capped
    # while it arrived.
    max_body = max(max_body, int(getattr(request, "max_body", max_body)))
    content = getattr(request, "content", None)
    if content is None:
        return False
    try:
        pos = content.tell()
        content.seek(0, 2)
        size = content.tell()
        content.seek(pos)
    except (OSError, ValueError):
        return False
    return bool(size > max_body)


class Gate(Resource):
    """Wraps the routed resource: assigns a request id, checks the token, caps bodies."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        inner: IResource,
        token: bytes,
        *,
        public: Collection[bytes] = (b"/api/health",),
        max_body: int = MAX_BODY_BYTES,
        on_response: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        if not token:
            raise ValueError("the admin token must not be empty")
        self._inner = inner
        self._token = token
        self._public = frozenset(public)
        self._max_body = max_body
        self._on_response = on_response

    def _path(self, request: IRequest) -> bytes:
        postpath: list[bytes] = request.postpath
        return b"/" + b"/".join(postpath)

    def _reject(
        self, request: IRequest, err: APIError, headers: dict[bytes, bytes] | None = None
    ) -> bytes:
        request.setResponseCode(err.code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        return json_bytes(err.body())

    def render(self, request: IRequest) -> Any:
        rid = uuid.uuid4().hex[:16]
        setattr(request, _REQUEST_ID_ATTR, rid)  # noqa: B010 - Request has no slot for it
        request.setHeader(b"x-request-id", rid.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        if self._on_response is not None:
            callback = self._on_response

            def count(_: object) -> None:
                callback(int(getattr(request, "code", 0)))

            request.notifyFinish().addBoth(count)  # type: ignore[attr-defined]
        public = request.method in (b"GET", b"HEAD") and self._path(request) in self._public
        if not public and not is_authorized(request, self._token):
            return self._reject(
                request,
                APIError(401, "missing or wrong admin token"),
                {b"www-authenticate": b'Bearer realm="myxd"'},
            )
        if _body_too_large(request, self._max_body):
            return self._reject(
                request, APIError(413, f"request body larger than {self._max_body} bytes", "body")
            )
        result = self._inner.render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result


def make_site(
    resource: IResource,
    reactor: Any = None,
    *,
    admin_token: bytes = b"",
    large_bodies: dict[bytes, int] | None = None,
) -> Site:
    """A Site for the admin API whose requests cap their bodies while reading them,
    and whose connections must deliver headers and bodies in time (deadlines.py).

    `large_bodies`: path -> byte limit for authenticated POST uploads (artifacts).
    """
    if reactor is not None:
        site = Site(resource, requestFactory=BoundedRequest, reactor=reactor, timeout=IDLE_TIMEOUT)
    else:
        site = Site(resource, requestFactory=BoundedRequest, timeout=IDLE_TIMEOUT)
    site.protocol = DeadlineChannel  # type: ignore[assignment]  # HTTP/1.1, plain TCP
    site.displayTracebacks = False
    site.admin_token = admin_token  # type: ignore[attr-defined]
    site.large_bodies = dict(large_bodies or {})  # type: ignore[attr-defined]
    return site
