"""A test HTTPS client for agents, pinned to the certificate's SHA-256 fingerprint.

The agent's certificate is self-signed, so there is no CA and no hostname to
check: the handshake succeeds only if the leaf certificate's DER bytes hash to
the expected fingerprint. There is no switch that turns the check off; a test
that wants to see a wrong pin fail passes a wrong fingerprint.

``AgentClient`` speaks JSON-RPC over treq with a persistent pool; ``RawTLS``
opens one pinned TLS connection for byte-level HTTP checks (identical 404s,
keep-alive reuse, a request whose body is never sent).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NO_TOKEN = object()


def normalize_fingerprint(value: str) -> str:
    """Lowercase hex without colons; raises ValueError unless it is 64 hex digits."""
    fp = value.replace(":", "").strip().lower()
    if not _HEX64.fullmatch(fp):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits")
    return fp


@implementer(IOpenSSLClientConnectionCreator)
class PinnedConnectionCreator:
    """Creates client TLS connections that accept only the pinned certificate."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = normalize_fingerprint(fingerprint)
        self.seen: List[str] = []  # fingerprints of the leaf certificates presented
        self.connections = 0  # TLS connections created (one handshake each)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            # Chain certificates carry no weight: only the pinned leaf counts.
            return True
        from cryptography.hazmat.primitives.serialization import Encoding

        der = cert.to_cryptography().public_bytes(Encoding.DER)
        actual = hashlib.sha256(der).hexdigest()
        self.seen.append(actual)
        return hmac.compare_digest(actual, self.fingerprint)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.connections += 1
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn


@implementer(IPolicyForHTTPS)
class PinnedPolicy:
    """treq/Agent TLS policy: every netloc uses the one pinned creator."""

    def __init__(self, fingerprint: str) -> None:
        self.creator = PinnedConnectionCreator(fingerprint)

    def creatorForNetloc(self, hostname: bytes, port: int) -> PinnedConnectionCreator:
        return self.creator


@dataclass
class HTTPResult:
    status: int
    headers: Dict[bytes, List[bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AgentRPCError(Exception):
    def __init__(self, error: Dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")
        self.error = error


class AgentClient:
    """JSON-RPC over pinned HTTPS to one agent, with a keep-alive pool."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        rpc_path: str,
        token: Optional[str],
        fingerprint: str,
        reactor: Any = None,
        persistent: bool = True,
        timeout: float = 60.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.base = f"https://{host}:{port}"
        self.rpc_path = rpc_path
        self.token = token
        self.timeout = timeout
        self.policy = PinnedPolicy(fingerprint)
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = 4
        self._http = HTTPClient(Agent(reactor, contextFactory=self.policy, pool=self.pool))
        self._next_id = 0

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    async def post(
        self,
        body: bytes,
        *,
        path: Optional[str] = None,
        method: str = "POST",
        token: Any = _NO_TOKEN,
        headers: Optional[Dict[str, List[str]]] = None,
    ) -> HTTPResult:
        """One HTTP request; *path* defaults to the RPC path, *token* to the agent's."""
        import treq

        hdrs: Dict[Any, Any] = {"Content-Type": ["application/json"]}
        tok = self.token if token is _NO_TOKEN else token
        if tok is not None:
            hdrs["X-Agent-Token"] = [tok]
        hdrs.update(headers or {})
        url = self.base + (path if path is not None else f"/{self.rpc_path}/rpc")
        resp = await self._http.request(
            method, url, data=body if body else None, headers=hdrs, timeout=self.timeout
        )
        content = await treq.content(resp)
        return HTTPResult(resp.code, dict(resp.headers.getAllRawHeaders()), content)

    async def rpc(self, payload: Any) -> Tuple[int, Any]:
        """POST a JSON payload; (HTTP status, decoded body or None when empty)."""
        result = await self.post(json.dumps(payload).encode())
        return result.status, (result.json() if result.body else None)

    async def call(self, method: str, params: Any = None) -> Any:
        """Call *method* and return its result; raises AgentRPCError on an error reply."""
        self._next_id += 1
        request: Dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
        if params is not None:
            request["params"] = params
        status, reply = await self.rpc(request)
        if status != 200:
            raise AssertionError(f"HTTP {status} for {method}: {reply!r}")
        if reply.get("id") != self._next_id:
            raise AssertionError(f"reply id {reply.get('id')!r} != {self._next_id}")
        if "error" in reply:
            raise AgentRPCError(reply["error"])
        return reply["result"]


class _Collector(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[None] = Deferred()
        self._waiters: List[Tuple[int, Deferred[None]]] = []
        self.reason: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [w for w in self._waiters if len(self.data) >= w[0]]
        self._waiters = [w for w in self._waiters if len(self.data) < w[0]]
        for _, d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.callback(None)
        self.closed.callback(None)

    def wait_for(self, size: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.data) >= size or self.closed.called:
            d.callback(None)
        else:
            self._waiters.append((size, d))
        return d


class RawTLS:
    """One pinned TLS connection for writing raw HTTP bytes and reading replies."""

    def __init__(self, proto: _Collector, creator: PinnedConnectionCreator) -> None:
        self._proto = proto
        self.creator = creator

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        fingerprint: str,
        reactor: Any = None,
        creator: Optional[PinnedConnectionCreator] = None,
    ) -> RawTLS:
        """Connect; pass *creator* to tune the client context (ALPN, versions)."""
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if creator is None:
            creator = PinnedConnectionCreator(fingerprint)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, host, port, timeout=30))
        proto = await endpoint.connect(Factory.forProtocol(_Collector))
        return cls(cast(_Collector, proto), creator)

    @property
    def negotiated_protocol(self) -> Optional[bytes]:
        return getattr(self._proto.transport, "negotiatedProtocol", None)

    @property
    def data(self) -> bytes:
        return bytes(self._proto.data)

    @property
    def is_closed(self) -> bool:
        return self._proto.closed.called

    def write(self, data: bytes) -> None:
        assert self._proto.transport is not None
        self._proto.transport.write(data)

    async def read_response(self, start: int = 0) -> Tuple[int, Dict[bytes, bytes], bytes, int]:
        """Parse one Content-Length response starting at *start* of the received bytes.

        Returns (status, lowercased headers, body, end offset).
        """
        while True:
            head_end = self._proto.data.find(b"\r\n\r\n", start)
            if head_end >= 0:
                break
            if self.is_closed:
                raise AssertionError(f"connection closed before a response: {self.data!r}")
            await self._proto.wait_for(len(self._proto.data) + 1)
        head = bytes(self._proto.data[start:head_end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower().encode()] = v.strip().encode()
        length = int(headers.get(b"content-length", b"0"))
        end = head_end + 4 + length
        await self._proto.wait_for(end)
        if len(self._proto.data) < end:
            raise AssertionError("connection closed in the middle of a response body")
        return status, headers, bytes(self._proto.data[head_end + 4 : end]), end

    async def wait_closed(self) -> None:
        await self._proto.closed

    async def close(self) -> None:
        if not self.is_closed:
            assert self._proto.transport is not None
            self._proto.transport.loseConnection()
            await self._proto.closed
