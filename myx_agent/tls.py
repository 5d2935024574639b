# -*- test-case-name: tests.agent.test_config -*-
"""The agent's TLS identity: a self-signed EC P-256 certificate, and the server context.

On first start the agent creates ``agent.key`` (mode 600) and ``agent.crt`` in
``ssl_dir`` (mode 700), and reuses them on every later start: the daemon pins
the certificate by the SHA-256 of its DER bytes, so this module must never
silently replace an existing identity. A half-present or unreadable pair is an
error (TLSSetupError, one line) that names the file.

Never log or return the private key.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import stat
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    from twisted.internet.ssl import CertificateOptions

KEY_FILE = "agent.key"
CERT_FILE = "agent.crt"

# Long enough never to expire under a running fleet; the pin, not the dates,
# is what a client checks.
_VALIDITY = datetime.timedelta(days=3650)


class TLSSetupError(Exception):
    """The TLS identity cannot be created or loaded. str() is one line."""


def fingerprint_of_pem(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, as 64 lowercase hex digits."""
    # Decoded here, as the stdlib's ssl.PEM_cert_to_DER_cert does: that keeps
    # both cryptography's x509 code and the stdlib ssl module (see
    # myx_agent.imports) out of the idle agent.
    import base64
    import binascii

    header, footer = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        text = cert_pem.decode("ascii").strip()
        if not (text.startswith(header) and text.endswith(footer)):
            raise ValueError("not a PEM certificate")
        der = base64.decodebytes(text[len(header) : -len(footer)].encode("ascii"))
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise TLSSetupError("certificate is not a PEM certificate") from None
    return hashlib.sha256(der).hexdigest()


def _write_new(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _generate(key_path: str, cert_path: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, (socket.gethostname() or "myx-agent")[:64])]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash between the two writes leaves a key without a
    # certificate, which the next start reports instead of guessing.
    _write_new(
        key_path,
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        0o600,
    )
    _write_new(cert_path, cert.public_bytes(Encoding.PEM), 0o644)


def _ensure_dir(ssl_dir: str) -> None:
    try:
        os.makedirs(ssl_dir, mode=0o700, exist_ok=True)
        st = os.stat(ssl_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise TLSSetupError(f"ssl_dir {ssl_dir}: not a directory")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(ssl_dir, 0o700)
    except OSError as e:
        raise TLSSetupError(f"ssl_dir {ssl_dir}: {e.strerror}") from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise TLSSetupError(f"ssl file {path}: cannot read: {e.strerror}") from None


def _generate_in_child(key_path: str, cert_path: str) -> None:
    """``_generate`` in a forked child, so that the code and memory that making a
    key and signing a certificate need (cryptography's OpenSSL backend and
    cipher modules, about 1 MiB of RSS) never enter the long-running agent
    (issue 14 §2). Only for a process with one thread: the agent's start."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            try:
                _generate(key_path, cert_path)
            except OSError as e:
                os.write(write_fd, f"OSError {e.errno}".encode())
                code = 1
            except BaseException as e:
                line = " ".join(f"{type(e).__name__}: {e}".split())
                os.write(write_fd, f"Error {line}"[:2000].encode())
                code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        chunks = []
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    try:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        # Reaped by someone else (SIGCHLD ignored): the report and then the
        # files themselves (read and checked by ensure_identity) decide.
        code = 0
    report = b"".join(chunks).decode("utf-8", "replace")
    if code == 0 and not report:
        return
    kind, _, detail = report.partition(" ")
    if kind == "OSError" and detail.isdigit():
        raise OSError(int(detail), os.strerror(int(detail)))
    raise TLSSetupError(f"cannot create the TLS identity: {detail or f'exit status {code}'}")


def ensure_identity(ssl_dir: str, generate_in_child: bool = False) -> Tuple[bytes, bytes]:
    """Create the key and certificate if neither exists; return (cert_pem, key_pem).

    Raises TLSSetupError when exactly one of them exists, or they do not load,
    or they do not belong together. ``generate_in_child``: make a new identity
    in a forked child (the agent's start; see ``_generate_in_child``).
    """
    _ensure_dir(ssl_dir)
    key_path = os.path.join(ssl_dir, KEY_FILE)
    cert_path = os.path.join(ssl_dir, CERT_FILE)
    have_key = os.path.lexists(key_path)
    have_cert = os.path.lexists(cert_path)
    if not have_key and not have_cert:
        try:
            if generate_in_child:
                _generate_in_child(key_path, cert_path)
            else:
                _generate(key_path, cert_path)
        except OSError as e:
            raise TLSSetupError(f"ssl_dir {ssl_dir}: cannot write: {e.strerror}") from None
    elif have_key != have_cert:
        present, missing = (key_path, cert_path) if have_key else (cert_path, key_path)
        raise TLSSetupError(
            f"ssl file {missing} is missing but {present} exists; "
            "remove both to create a new identity (clients must re-pin it)"
        )
    try:
        if stat.S_IMODE(os.stat(key_path).st_mode) != 0o600:
            os.chmod(key_path, 0o600)
    except OSError as e:
        raise TLSSetupError(f"ssl file {key_path}: {e.strerror}") from None
    cert_pem = _read(cert_path)
    key_pem = _read(key_path)
    # The pair is checked when the server context is built (server_context).
    return cert_pem, key_pem


def server_context(cert_pem: bytes, key_pem: bytes, ssl_dir: str = "") -> CertificateOptions:
    """A server context factory for the agent's listener: TLS 1.2 or newer, HTTP/1.1.

    The context is built here, so a certificate or key that does not load, or
    that do not belong together, is a TLSSetupError now rather than a failed
    handshake later.
    """
    from OpenSSL import SSL, crypto
    from twisted.internet.error import VerifyError
    from twisted.internet.ssl import CertificateOptions, PrivateCertificate, TLSVersion

    try:
        pc = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except VerifyError:
        raise TLSSetupError(
            f"ssl_dir {ssl_dir}: {CERT_FILE} does not match the key in {KEY_FILE}"
        ) from None
    except (crypto.Error, SSL.Error, ValueError):
        raise TLSSetupError(
            f"ssl_dir {ssl_dir}: {CERT_FILE}/{KEY_FILE} are not a PEM certificate "
            "and an unencrypted PEM key"
        ) from None
    # ALPN must name http/1.1: Twisted always installs an ALPN select
    # callback, and with an empty list it aborts every handshake in which the
    # client offers ALPN (curl, browsers, most HTTP libraries). Never h2.
    options = CertificateOptions(
        privateKey=pc.privateKey.original,
        certificate=pc.original,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=[b"http/1.1"],
    )
    try:
        options.getContext()
    except SSL.Error:
        raise TLSSetupError(
            f"ssl_dir {ssl_dir}: {CERT_FILE} does not match the key in {KEY_FILE}"
        ) from None
    return options
