# -*- test-case-name: tests.install.test_hostkeys -*-
"""SSH host-key trust for installs: a user's pin, a stored key, or trust on first use.

Every SSH connection the installer makes is checked here BEFORE authentication,
so no password, key signature or sudo password ever reaches a host whose key is
not the expected one. The rules, in order:

1. The user gave a fingerprint (``SHA256:base64`` as ``ssh-keygen -l`` prints it,
   or the 64 hex digits of the same SHA-256): the presented key must match it.
2. A key is stored for the server (learnt earlier): the presented key must be
   exactly that key. A changed key is refused; nothing is overwritten.
3. Neither: trust on first use. The key is accepted and handed to a callback
   that stores it, but only once the key exchange has proven that the server
   holds the private key (``HostKeyCheck.confirm`` after the transport is secure).

This module is pure: no I/O, no reactor. It never logs keys' private parts (it
never sees any) and never weakens a check to make a connection succeed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

from twisted.conch.ssh.keys import BadKeyError, Key

from myxd.errors import MyxError

# Host-key algorithms the client offers, in preference order. SHA-1 ``ssh-rsa``
# and DSA are left out on purpose: OpenSSH >= 8.8 refuses them too.
_ALGORITHMS_BY_TYPE: dict[str, list[bytes]] = {
    "ssh-ed25519": [b"ssh-ed25519"],
    "ecdsa": [b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp521"],
    "ssh-rsa": [b"rsa-sha2-512", b"rsa-sha2-256"],
}
# Groups tried in turn when only a fingerprint is pinned: the pin names one key
# of the server, and the server picks which key to show from what we offer.
ALGORITHM_GROUPS: list[list[bytes]] = [
    _ALGORITHMS_BY_TYPE["ssh-ed25519"],
    _ALGORITHMS_BY_TYPE["ecdsa"],
    _ALGORITHMS_BY_TYPE["ssh-rsa"],
]
ALL_ALGORITHMS: list[bytes] = [alg for group in ALGORITHM_GROUPS for alg in group]

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]{43}=?$")


class HostKeyError(MyxError):
    """Base class of host-key trust failures. ``str()`` is safe to show a user."""


class HostKeyMismatch(HostKeyError):
    """The server presented a key other than the pinned or stored one."""

    def __init__(self, message: str, presented: str, expected: str) -> None:
        super().__init__(message)
        self.presented = presented  # SHA256:... of the presented key
        self.expected = expected  # SHA256:... (or key description) that was expected


class InvalidFingerprint(HostKeyError, ValueError):
    """A user-given fingerprint could not be read."""


class InvalidHostKey(HostKeyError, ValueError):
    """A stored host key (OpenSSH public key line) could not be read."""


def sha256_digest(key_blob: bytes) -> bytes:
    return hashlib.sha256(key_blob).digest()


def format_fingerprint(key_blob: bytes) -> str:
    """``SHA256:...`` exactly as ``ssh-keygen -l`` prints it (base64, no padding)."""
    b64 = base64.b64encode(sha256_digest(key_blob)).decode("ascii").rstrip("=")
    return "SHA256:" + b64


def parse_fingerprint(text: str) -> bytes:
    """Read a user's host-key fingerprint into the 32-byte SHA-256 digest.

    Accepted: ``SHA256:<base64>`` (padding optional) as ssh-keygen prints it, or
    64 hex digits (colons and case ignored, optional ``SHA256:`` prefix).
    MD5 fingerprints are refused: they are too weak to pin a key.
    """
    if not isinstance(text, str):
        raise InvalidFingerprint("host key fingerprint must be a string")
    value = text.strip()
    if value.upper().startswith("MD5:"):
        raise InvalidFingerprint("MD5 host key fingerprints are not accepted; give the SHA256 one")
    body = value[7:] if value[:7].upper() == "SHA256:" else value
    hexbody = body.replace(":", "").lower()
    if _HEX_RE.match(hexbody):
        return binascii.unhexlify(hexbody)
    if _B64_RE.match(body):
        padded = body if body.endswith("=") else body + "="
        try:
            digest = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) == 32:
            return digest
    raise InvalidFingerprint(
        "host key fingerprint must be SHA256:<base64> (as ssh-keygen -l prints it) or 64 hex digits"
    )


def parse_public_key(line: str) -> Key:
    """Read an OpenSSH public key line (``type base64 [comment]``)."""
    try:
        key = Key.fromString(line.strip().encode("ascii"))
    except (BadKeyError, ValueError, UnicodeError, binascii.Error, struct.error, IndexError):
        raise InvalidHostKey("stored host key is not a valid OpenSSH public key") from None
    if not key.isPublic():
        raise InvalidHostKey("stored host key must be a public key")
    return key


def openssh_line(key_blob: bytes) -> str:
    """The OpenSSH public key line of a key blob (no comment)."""
    return Key.fromString(key_blob).public().toString("openssh").decode("ascii")


def algorithms_for_key(key: Key) -> list[bytes]:
    """The host-key algorithms under which a server shows this key."""
    ssh_type = key.sshType()
    if ssh_type.startswith(b"ecdsa-"):
        return [ssh_type]
    if ssh_type == b"ssh-rsa":
        return list(_ALGORITHMS_BY_TYPE["ssh-rsa"])
    return [ssh_type]


OnFirstUse = Callable[[str], "Awaitable[None] | None"]


@dataclass(frozen=True)
class HostKeyPolicy:
    """What a server's key must be. Built from the server record.

    ``pinned``: the user's fingerprint (any form ``parse_fingerprint`` reads).
    ``known_key``: the stored OpenSSH public key line, if one was learnt before.
    ``on_first_use``: called with the OpenSSH line of a key accepted by trust on
    first use (or of a pinned key not yet stored), after the key exchange proved
    the server holds it. It may return an awaitable; the connection waits for it.
    """

    pinned: str | None = None
    known_key: str | None = None
    on_first_use: OnFirstUse | None = None

    def __post_init__(self) -> None:
        # Fail at construction, not mid-handshake, on unreadable inputs.
        if self.pinned is not None:
            parse_fingerprint(self.pinned)
        if self.known_key is not None:
            parse_public_key(self.known_key)

    def algorithm_groups(self) -> list[list[bytes]]:
        """The host-key algorithm lists to offer, one connection attempt each.

        With a stored key (and no pin), only that key's algorithms are offered, so
        the server shows that key. With a pin, each key type is tried in turn
        until one matches. With neither, one attempt offering every algorithm.
        """
        if self.pinned is None and self.known_key is not None:
            return [algorithms_for_key(parse_public_key(self.known_key))]
        if self.pinned is not None:
            return [list(group) for group in ALGORITHM_GROUPS]
        return [list(ALL_ALGORITHMS)]

    def check(self, key_blob: bytes) -> HostKeyCheck:
        """Judge a presented key. Raises HostKeyMismatch; never stores anything."""
        presented = format_fingerprint(key_blob)
        if self.pinned is not None:
            want = parse_fingerprint(self.pinned)
            if sha256_digest(key_blob) != want:
                expected = "SHA256:" + base64.b64encode(want).decode("ascii").rstrip("=")
                raise HostKeyMismatch(
                    f"host key {presented} does not match the pinned fingerprint {expected}; "
                    "no credentials were sent",
                    presented,
                    expected,
                )
            store = self.known_key is None or parse_public_key(self.known_key).blob() != key_blob
            return HostKeyCheck(key_blob, "pinned", store)
        if self.known_key is not None:
            known = parse_public_key(self.known_key)
            if known.blob() != key_blob:
                expected = format_fingerprint(known.blob())
                raise HostKeyMismatch(
                    f"host key changed: the server now presents {presented}, but {expected} "
                    "was stored on first use; refusing to connect and no credentials were "
                    "sent (if the change is expected, forget the stored key and reinstall)",
                    presented,
                    expected,
                )
            return HostKeyCheck(key_blob, "known", False)
        return HostKeyCheck(key_blob, "first-use", True)


@dataclass(frozen=True)
class HostKeyCheck:
    """A key that passed ``HostKeyPolicy.check``; ``store`` says it must be saved."""

    key_blob: bytes
    reason: str  # pinned | known | first-use
    store: bool

    @property
    def fingerprint(self) -> str:
        return format_fingerprint(self.key_blob)

    @property
    def openssh(self) -> str:
        return openssh_line(self.key_blob)
