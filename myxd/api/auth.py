"""Bearer-token check for the admin API.

The comparison is constant-time (`hmac.compare_digest`) over the raw bytes, so a
client cannot learn the token byte by byte from response timing. This module never
logs or returns the token, and never accepts a missing or empty one.
"""

from __future__ import annotations

import hmac

from twisted.web.iweb import IRequest

__all__ = ["bearer_token", "is_authorized"]


def bearer_token(request: IRequest) -> bytes | None:
    """The credentials of an `Authorization: Bearer ...` header, or None."""
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        # Two Authorization headers are ambiguous; refuse rather than pick one.
        return None
    scheme, _, credentials = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    credentials = credentials.strip()
    return credentials or None


def is_authorized(request: IRequest, expected: bytes) -> bool:
    if not expected:
        return False
    given = bearer_token(request)
    if given is None:
        # Compare anyway so a missing header costs the same as a wrong one.
        hmac.compare_digest(expected, b"\x00" * len(expected))
        return False
    return hmac.compare_digest(given, expected)
