# -*- test-case-name: tests.agent.test_rpc_server -*-
"""The agent's HTTP surface: one endpoint, ``POST /{rpc_path}/rpc``, in front of the dispatcher.

Two layers, both in this module:

- The early gate, ``AgentRequest`` (a twisted.web.server Request, built by
  ``AgentSite``), judges a request as soon as its headers are in, before a
  byte of the body is read: any other path or method gets the same fixed 404
  bytes (token or not), then a missing or wrong ``X-Agent-Token`` (compared in
  constant time) gets 401, then a declared body over 1 MiB gets 413. Each
  rejection is written raw and closes the connection, so an unread body is
  never parsed. A chunked body is counted as it arrives and cut off at the
  same limit. A resource cannot do this: it only runs once the body is in.
- The Klein app, ``AgentRPCApp``, renders the requests the gate lets through.
  Its one route checks path and token again, in constant time, before the
  body is parsed, then hands the body to the JSON-RPC dispatcher. Everything
  else it is asked for (other routes, routing redirects, its own errors) gets
  the gate's answers, never a Klein or werkzeug page and never a traceback.

It is a little over 500 lines because the gate and the app answer the same
refusals with the same bytes and must be read together; the dispatcher
(``jsonrpc``) and the method table (``methods``) live beside it.

One log event per request: method(s), outcome, duration, peer. Never log the
token, the rpc_path or a request body. Never add a Server header or any other
detail that tells one agent version from another.

Importing klein imports the global reactor; nothing here uses it (the site
takes the reactor it is given).
"""

from __future__ import annotations

import hmac
import json
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union, cast

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from myx_agent.errors import INTERNAL_ERROR, INVALID_REQUEST, UNAUTHORIZED

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IRequest
    from twisted.web.resource import IResource

    from myx_agent.jsonrpc import Dispatcher, DispatchResult

MAX_BODY_BYTES = 1 << 20
# The daemon's pool keeps connections for 120 s between heartbeats up to 60 s
# apart; the agent must keep them longer than that.
KEEPALIVE_IDLE_TIMEOUT = 300.0
# Slowloris bounds: the idle timeout restarts on every byte, so a client that
# trickles a byte a second would hold a connection forever. A new connection
# (TLS handshake included) and then each request, from its first byte, must
# complete the request line and headers within HEADER_TIMEOUT, and the body
# (at most 1 MiB) within BODY_TIMEOUT after that; otherwise the connection is
# dropped. Documented in docs/protocol.md.
HEADER_TIMEOUT = 30.0
BODY_TIMEOUT = 60.0


class Rejection(NamedTuple):
    """A fixed answer sent instead of the dispatcher's."""

    code: int
    reason: bytes
    content_type: bytes
    body: bytes
    outcome: str  # for the log event

    @property
    def raw(self) -> bytes:
        """The whole response, byte for byte (no Date, no Server header)."""
        head = (
            b"HTTP/1.1 %d %s\r\n" % (self.code, self.reason)
            + b"Content-Type: %s\r\n" % self.content_type
            + b"Content-Length: %d\r\n" % len(self.body)
            + b"Connection: close\r\n\r\n"
        )
        return head + self.body


def _jsonrpc_error(code: int, message: str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": None},
        separators=(",", ":"),
    ).encode("ascii")


# Every unknown path or method gets exactly the same bytes, so a scan learns
# nothing from the answer.
REJECT_NOT_FOUND = Rejection(404, b"Not Found", b"text/plain", b"not found\n", "http 404 not found")
REJECT_UNAUTHORIZED = Rejection(
    401,
    b"Unauthorized",
    b"application/json",
    _jsonrpc_error(UNAUTHORIZED, "unauthorized"),
    "http 401 unauthorized",
)
REJECT_TOO_LARGE = Rejection(
    413,
    b"Payload Too Large",
    b"application/json",
    _jsonrpc_error(INVALID_REQUEST, "request body too large"),
    "http 413 body too large",
)
NOT_FOUND_RESPONSE = REJECT_NOT_FOUND.raw
UNAUTHORIZED_RESPONSE = REJECT_UNAUTHORIZED.raw
TOO_LARGE_RESPONSE = REJECT_TOO_LARGE.raw
_INTERNAL_ERROR_BODY = _jsonrpc_error(INTERNAL_ERROR, "internal error")


class RequestGate:
    """The rule both layers apply: path, then method, then token, then size."""

    def __init__(self, *, rpc_path: str, token: str, max_body: int = MAX_BODY_BYTES) -> None:
        self._uri = b"/" + rpc_path.encode("ascii") + b"/rpc"
        self._token = token.encode("ascii")
        self.max_body = max_body

    def __repr__(self) -> str:
        return "<RequestGate>"  # never show the token or the path

    def judge(
        self, method: bytes, uri: bytes, headers: Headers, length: Optional[int]
    ) -> Optional[Rejection]:
        """The rejection to send, or None when the request may be read."""
        # The path is a secret too (the scan defence), so it is compared in
        # constant time like the token.
        if not hmac.compare_digest(uri, self._uri) or method != b"POST":
            return REJECT_NOT_FOUND
        tokens = headers.getRawHeaders(b"x-agent-token")
        # compare_digest runs in time independent of where the bytes differ.
        if tokens is None or len(tokens) != 1 or not hmac.compare_digest(tokens[0], self._token):
            return REJECT_UNAUTHORIZED
        if length is not None and length > self.max_body:
            return REJECT_TOO_LARGE
        return None


def _log_request(
    log: Logger, request: IRequest, methods: str, outcome: str, duration_ms: float
) -> None:
    host = getattr(request.getClientAddress(), "host", "-")
    log.info(
        "rpc {methods} {outcome} in {duration_ms:.1f} ms from {peer}",
        methods=methods,
        outcome=outcome,
        duration_ms=duration_ms,
        peer=host,
    )


class AgentRequest(Request):
    """A request judged by the site's gate at end of headers, then rendered by the site.

    Also the agent's one place that logs a request: see log_event.
    """

    log = Logger()
    _gate: Optional[RequestGate] = None
    _rejected = False
    _judged = False
    _received = 0
    _started = 0.0
    _clock: Callable[[], float] = staticmethod(time.monotonic)

    def __repr__(self) -> str:
        # Twisted's repr shows the URI, which holds the secret rpc_path, and
        # the request is the log_source of every event it emits.
        return f"<AgentRequest at 0x{id(self):x}>"

    def _site(self) -> AgentSite:
        site = getattr(self.channel, "site", None)
        if not isinstance(site, AgentSite):
            raise RuntimeError("AgentRequest needs an AgentSite")
        return site

    def _start(self) -> RequestGate:
        site = self._site()
        self._gate = site.gate
        # Kept here: the channel (and so the site) is gone once the request ends.
        self._clock = site.monotonic
        self._started = site.monotonic()
        return site.gate

    def gotLength(self, length: Optional[int]) -> None:
        # The body never goes to a temporary file: it is capped at max_body.
        self.content = BytesIO()
        gate = self._start()
        # The request line is only on the channel until the body is in; these
        # attributes are Twisted internals (stable since 16.x). If they are
        # gone, process() judges the request instead, still before parsing.
        method = getattr(self.channel, "_command", None)
        uri = getattr(self.channel, "_path", None)
        if isinstance(method, bytes) and isinstance(uri, bytes):
            self._judged = True
            rejection = gate.judge(method, uri, self.requestHeaders, length)
            if rejection is not None:
                self.reject(rejection)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        assert self._gate is not None
        if self._received > self._gate.max_body:
            self.reject(REJECT_TOO_LARGE)
            return
        assert self.content is not None
        self.content.write(data)

    def reject(self, rejection: Rejection) -> None:
        """Send the fixed answer, close the connection and log the request.

        Whatever else is written to this request afterwards is dropped.
        """
        self._rejected = True
        self.content = BytesIO()
        # Otherwise the channel would answer "100 Continue" after the rejection.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.write(rejection.raw)
            channel.loseConnection()
        self.log_event("-", rejection.outcome)

    def process(self) -> None:
        if self._rejected:
            return
        if not self._judged:
            gate = self._gate or self._start()
            rejection = gate.judge(self.method, self.uri, self.requestHeaders, None)
            if rejection is not None:
                self.reject(rejection)
                return
        super().process()

    def write(self, data: bytes) -> None:
        if not self._rejected:
            super().write(data)

    def finish(self) -> None:
        # A rejected request is answered already; its connection is closing.
        if not self._rejected:
            super().finish()

    def processingFailed(self, reason: Failure) -> Failure:
        # Never twisted.web's HTML error page: the JSON-RPC internal error.
        self.log.failure("request handling failed", reason)
        if not self._disconnected:
            if self.startedWriting:
                self.loseConnection()
            else:
                _response_head(self, 200, b"application/json", _INTERNAL_ERROR_BODY)
                self.write(_INTERNAL_ERROR_BODY)
                self.finish()
        self.log_event("-", f"error {INTERNAL_ERROR}")
        return reason

    def getRequestHostname(self) -> bytes:
        # Klein answers 400 (and logs a traceback) for a Host it cannot decode;
        # the agent serves the same endpoint whatever the Host says.
        name: bytes = super().getRequestHostname()
        return name if name.isascii() else b"invalid"

    def log_event(self, methods: str, outcome: str) -> None:
        """The request's one log event, timed from the end of its headers."""
        elapsed = (self._clock() - self._started) * 1000 if self._gate is not None else 0.0
        _log_request(self.log, self, methods, outcome, elapsed)


class AgentChannel(HTTPChannel):
    """HTTP/1.1 channel with a deadline for a request's headers and one for its body.

    The header deadline starts when the connection is made (so a client that
    never finishes the TLS handshake is dropped too) and then with the first
    byte of each later request; it is not running while a kept-alive
    connection idles between requests (the idle timeout covers that). It is
    cleared once the whole body is in.
    """

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    _deadline: Any = None
    log = Logger()

    def __repr__(self) -> str:
        return "<AgentChannel>"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm(self.header_timeout, "headers")

    def dataReceived(self, data: bytes) -> None:
        if data and self._deadline is None and not getattr(self, "_handlingRequest", False):
            self._arm(self.header_timeout, "headers")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._arm(self.body_timeout, "body")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._disarm()
        super().connectionLost(reason)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, lambda: self._expired(what))

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _expired(self, what: str) -> None:
        self._deadline = None
        peer = getattr(self.transport.getPeer(), "host", "-") if self.transport else "-"
        self.log.info("dropped a connection from {peer}: {what} too slow", peer=peer, what=what)
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()


class AgentSite(Site):
    """The agent's Site: AgentRequest gate, long keep-alive, no access log.

    twisted.web's access log is replaced by one event per request, which
    leaves out the secret path.
    """

    noisy = False  # no "Starting factory" lines; main logs the listener once
    protocol = AgentChannel  # type: ignore[assignment]  # HTTP/1.1 only (ALPN never offers h2), with deadlines

    def __init__(
        self,
        resource: IResource,
        gate: RequestGate,
        *,
        idle_timeout: float = KEEPALIVE_IDLE_TIMEOUT,
        reactor: Optional[IReactorTime] = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            resource,
            requestFactory=AgentRequest,
            # Bodies are JSON-RPC only; never spend time parsing form uploads.
            parsePOSTFormSubmission=False,
            timeout=idle_timeout,
            reactor=reactor,
        )
        self.gate = gate
        self.monotonic = monotonic

    def __repr__(self) -> str:
        return "<AgentSite>"

    def startFactory(self) -> None:
        # HTTPFactory would tick a timer every second for access-log dates.
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass


class AgentRPCApp:
    """The Klein app behind the gate: ``POST /{rpc_path}/rpc`` to the dispatcher.

    In the agent it is the root resource of an AgentSite, and answers with
    AgentRequest.reject when it refuses a request, so its refusals are the
    gate's bytes. In a plain Site (tests, a simulator) a refusal is an
    ordinary response with the same status, content type and body.
    """

    _app = Klein()
    log = Logger()

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        rpc_path: str,
        token: str,
        max_body: int = MAX_BODY_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dispatcher = dispatcher
        self._gate = RequestGate(rpc_path=rpc_path, token=token, max_body=max_body)
        self._monotonic = monotonic

    def __repr__(self) -> str:
        return "<AgentRPCApp>"  # never show the token or the path

    def resource(self) -> IResource:
        """The resource to serve at the root of a site."""
        resource: IResource = self._app.resource()
        return resource

    # The path segment is matched by shape only: which path is the secret one
    # is decided by the gate's constant-time comparison in rpc().
    @_app.route("/<rpc_path>/rpc", methods=["POST"])
    def rpc(self, request: IRequest, rpc_path: str) -> Union[bytes, Deferred[bytes]]:
        started = self._monotonic()
        # Defence in depth: the same rule as the gate, before the body is parsed.
        rejection = self._gate.judge(request.method, request.uri, request.requestHeaders, None)
        if rejection is not None:
            return self._refuse(request, rejection, started)
        content = request.content
        body = b""
        if content is not None:
            body = content.read(self._gate.max_body + 1)
            # A long poll can hold the request for 30 s; not its body as well.
            content.seek(0)
            content.truncate()
        if len(body) > self._gate.max_body:
            return self._refuse(request, REJECT_TOO_LARGE, started)
        # Klein cancels this when the client goes away; the dispatch itself
        # runs to its end (a command may be starting), and is logged.
        answer: Deferred[bytes] = Deferred()
        d = self._dispatcher.dispatch(body)
        d.addCallbacks(
            self._respond,
            self._failed,
            callbackArgs=(request, started, answer),
            errbackArgs=(request, started, answer),
        )
        d.addErrback(lambda f: self.log.failure("cannot send a response", f))
        return answer

    @_app.handle_errors(HTTPException)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        # werkzeug's 404, 405 and redirects (e.g. for "//") all look alike.
        return self._refuse(request, REJECT_NOT_FOUND, None)

    @_app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("request handling failed", failure)
        _response_head(request, 200, b"application/json", _INTERNAL_ERROR_BODY)
        self._log_event(request, "-", f"error {INTERNAL_ERROR}", None)
        return _INTERNAL_ERROR_BODY

    def _respond(
        self, result: DispatchResult, request: IRequest, started: float, answer: Deferred[bytes]
    ) -> None:
        if answer.called:  # cancelled: the client is gone
            self._log_event(request, result.methods, result.outcome + " (client gone)", started)
            return
        if result.body is None:
            _response_head(request, 204, None, b"")
        else:
            _response_head(request, 200, b"application/json", result.body)
        self._log_event(request, result.methods, result.outcome, started)
        answer.callback(result.body or b"")

    def _failed(
        self, failure: Failure, request: IRequest, started: float, answer: Deferred[bytes]
    ) -> None:
        # The dispatcher answers every error itself; this is a last resort.
        self.log.failure("request handling failed", failure)
        self._log_event(request, "-", f"error {INTERNAL_ERROR}", started)
        if not answer.called:
            _response_head(request, 200, b"application/json", _INTERNAL_ERROR_BODY)
            answer.callback(_INTERNAL_ERROR_BODY)

    def _refuse(self, request: IRequest, rejection: Rejection, started: Optional[float]) -> bytes:
        if isinstance(request, AgentRequest):
            request.reject(rejection)  # logs; Klein's write and finish are then dropped
            return b""
        _response_head(request, rejection.code, rejection.content_type, rejection.body)
        self._log_event(request, "-", rejection.outcome, started)
        return rejection.body

    def _log_event(
        self, request: IRequest, methods: str, outcome: str, started: Optional[float]
    ) -> None:
        if isinstance(request, AgentRequest):
            request.log_event(methods, outcome)
            return
        elapsed = (self._monotonic() - started) * 1000 if started is not None else 0.0
        _log_request(self.log, request, methods, outcome, elapsed)


def _response_head(
    request: IRequest, code: int, content_type: Optional[bytes], body: bytes
) -> None:
    """Set status and headers, and drop the Server and Date that twisted.web adds."""
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.removeHeader(b"server")
    headers.removeHeader(b"date")
    if content_type is not None:
        headers.setRawHeaders(b"content-type", [content_type])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])


def build_factory(
    *,
    rpc_path: str,
    token: str,
    dispatcher: Dispatcher,
    reactor: Optional[IReactorTime] = None,
    idle_timeout: float = KEEPALIVE_IDLE_TIMEOUT,
) -> AgentSite:
    """The site to listen with (wrap it in TLS with tls.server_context)."""
    app = AgentRPCApp(dispatcher=dispatcher, rpc_path=rpc_path, token=token)
    gate = RequestGate(rpc_path=rpc_path, token=token)
    return AgentSite(app.resource(), gate, idle_timeout=idle_timeout, reactor=reactor)
