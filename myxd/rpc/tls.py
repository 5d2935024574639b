"""Pinned-certificate TLS for the daemon's connections to agents.

Every agent serves a self-signed certificate; the daemon trusts exactly one
certificate per agent: the one whose SHA-256 (of the DER bytes) it has pinned.
No CA store and no hostname check take part, because neither means anything for
a self-signed certificate. The pin is checked inside the TLS handshake by the
OpenSSL verify callback, so a certificate that does not match aborts the
handshake before the HTTP request (and with it the agent token) is written:
Twisted buffers application data until the handshake has completed.

This module must never offer a way to skip or weaken the check. An endpoint
without a registered pin is refused like a mismatch. It never logs tokens (it
never sees them).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = [
    "PinMismatchError",
    "PinRegistry",
    "PinnedTLSPolicy",
    "certificate_fingerprint",
    "normalize_fingerprint",
]

_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")

# The pin a connection must see travels on the pyOpenSSL Connection object
# itself, so that ONE SSL context serves every agent: a context per pin cost
# 16 kB of OpenSSL memory per agent (160 MB for 10,000 agents) and an
# SSL_CTX_new per agent on a cold start.
_PIN_ATTR = "_myx_expected_pin"


def normalize_fingerprint(value: str) -> str:
    """Return the pin as 64 lowercase hex digits; colons, blanks and case are ignored.

    Raises ValueError (whose message names no secret) when it is not a SHA-256.
    """
    if not isinstance(value, str):
        raise ValueError("cert_fingerprint must be a string of 64 hex digits")
    cleaned = value.strip().replace(":", "").lower()
    if not _FINGERPRINT_RE.match(cleaned):
        raise ValueError(
            "cert_fingerprint must be the SHA-256 of the certificate's DER bytes: "
            "64 hex digits (colons and case are ignored)"
        )
    return cleaned


def certificate_fingerprint(der: bytes) -> str:
    """The pin of a DER-encoded certificate: SHA-256, 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


class PinMismatchError(Exception):
    """The peer's certificate is not the pinned one (or there is no pin at all).

    Carried as the connection-lost reason; `myxd.rpc.retry.classify` turns it into
    a final `CertificateMismatch`, which is never retried.
    """

    def __init__(self, expected: str | None, actual: str | None) -> None:
        if expected is None:
            message = "no certificate pin is registered for this agent"
        else:
            message = (
                f"agent certificate changed: pinned sha256 {expected}, "
                f"presented {actual or 'unreadable certificate'}"
            )
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class _PinVerifier:
    """The OpenSSL verify callback: the leaf must hash to the connection's own pin."""

    log = Logger()

    def __call__(self, conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        # OpenSSL's own verdict (ok) is ignored on purpose: a self-signed
        # certificate always "fails" CA verification. Certificates above the leaf
        # are irrelevant, since only the leaf's key signs the handshake and the
        # leaf (depth 0) is always offered to this callback.
        if depth != 0:
            return True
        actual: str | None = None
        try:
            # Set by _PinnedConnectionCreator before the handshake; a connection
            # made any other way has none and is refused like a mismatch.
            expected: str | None = getattr(conn, _PIN_ATTR, None)
            actual = certificate_fingerprint(cert.to_cryptography().public_bytes(Encoding.DER))
            if expected is not None and hmac.compare_digest(actual, expected):
                return True
            failure = Failure(PinMismatchError(expected, actual))
            protocol = conn.get_app_data()
            fail = getattr(protocol, "failVerification", None)
            if fail is not None:
                # Same mechanism as Twisted's own hostname check: the reason
                # reaches the HTTP client's connectionLost, so the mismatch is
                # reported distinctly instead of as a generic handshake error.
                fail(failure)
        except BaseException:
            # An exception must never turn into acceptance, and must not vanish.
            self.log.failure("while checking an agent certificate pin")
        return False


def _make_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # No session resumption: a resumed session would skip the certificate check.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    # A keep-alive connection idles between heartbeats far longer than it
    # works: let OpenSSL free its ~34 kB of record buffers while idle.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _PinVerifier())
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedConnectionCreator:
    def __init__(self, context: SSL.Context, expected: str | None) -> None:
        self._context = context
        self._expected = expected

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        # Fixed for the life of this connection, before any handshake byte.
        setattr(connection, _PIN_ATTR, self._expected)
        connection.set_app_data(tlsProtocol)
        return connection


class PinRegistry:
    """(host, port) -> pinned fingerprint, kept up to date by the RPC client."""

    def __init__(self) -> None:
        self._pins: dict[tuple[str, int], str] = {}

    def set(self, host: str, port: int, fingerprint: str) -> None:
        key = (host, port)
        # Called before every request: skip the re-validation of an unchanged pin.
        if self._pins.get(key) != fingerprint:
            self._pins[key] = normalize_fingerprint(fingerprint)

    def get(self, host: str, port: int) -> str | None:
        return self._pins.get((host, port))

    def discard(self, host: str, port: int) -> None:
        self._pins.pop((host, port), None)

    def __len__(self) -> int:
        return len(self._pins)


@implementer(IPolicyForHTTPS)
class PinnedTLSPolicy:
    """`IPolicyForHTTPS` for `twisted.web.client.Agent`: TLS >= 1.2 pinned per netloc.

    One SSL context (built once) serves every agent; each connection carries
    the pin registered for its (host, port) when it was created.
    """

    def __init__(self, pins: PinRegistry) -> None:
        self.pins = pins
        self.context = _make_context()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else str(hostname)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return _PinnedConnectionCreator(self.context, self.pins.get(host, port))
