"""The daemon's artifact store: release archives kept once, named by their SHA-256.

Layout under ``<data-dir>/artifacts/``:

- ``<sha256>``: the bytes, read-only (0444 once complete);
- ``<sha256>.json``: ``{"name", "size", "created_at"}``, written after the bytes;
- ``.incoming/``: uploads in progress, removed on any failure.

An artifact exists when both files exist; ``list_all``/``get`` ignore a bytes file
without its metadata (a crash between the two renames), and ``ingest`` of the
same bytes repairs it.

Every file operation runs in a worker thread (hashing 512 MiB must never block
the reactor). An upload is copied from the request's spooled body while it is
hashed and counted, checked (size limit, expected SHA-256, a ``.dgst`` already
stored beside it), fsynced, then renamed into place: a failure of any kind,
a full disk included, leaves nothing behind.

Never holds a whole artifact in memory, and never writes outside its root.
"""

# test-case-name: tests.daemon.test_artifacts

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from myxd.errors import MyxError

COPY_CHUNK = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
# Names as operators give them: a file name, no path.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}\Z")
DGST_SUFFIX = ".dgst"
# The official Xray .dgst lines: "SHA2-256= <hex>" (also "SHA256 (x) = <hex>").
_DGST_LINE = re.compile(r"^\s*(?:SHA2-256|SHA256)\b[^=]*=\s*([0-9a-fA-F]{64})\s*$", re.M)

T = TypeVar("T")


class ArtifactError(MyxError):
    """An artifact cannot be stored or used; the message is for the operator."""


class ArtifactInvalid(ArtifactError):
    """Bad name or bad expected digest (HTTP 400)."""


class ArtifactTooLarge(ArtifactError):
    """Over ``artifact_max_bytes`` (HTTP 413)."""


class ArtifactMismatch(ArtifactError):
    """The bytes do not hash to what was expected (HTTP 422)."""


class ArtifactStoreFull(ArtifactError):
    """The disk is full or over quota (HTTP 507)."""


class ArtifactNotFound(ArtifactError):
    """No artifact with that id (HTTP 404)."""


@dataclass(frozen=True)
class Artifact:
    id: str
    name: str
    size: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "created_at": self.created_at}


def parse_dgst(text: str) -> str:
    """The SHA-256 hex (lower case) of a ``.dgst`` file's text."""
    m = _DGST_LINE.search(text)
    if m is None:
        raise ArtifactInvalid("the .dgst file has no 'SHA2-256= <hex>' line")
    return m.group(1).lower()


def check_sha256(value: str) -> str:
    v = value.strip().lower()
    if not SHA256_RE.match(v):
        raise ArtifactInvalid("sha256 must be 64 hexadecimal characters")
    return v


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ArtifactInvalid(
            "name must be a file name of letters, digits and ._+@- (at most 200 characters)"
        )
    return name


class ArtifactStore:
    """Content-addressed files under ``root``; every method returns a Deferred."""

    log = Logger()

    def __init__(
        self,
        root: str,
        max_bytes: int,
        reactor: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._reactor = reactor
        self._now = clock
        self._incoming = os.path.join(root, ".incoming")

    # -- public API ----------------------------------------------------------

    def ingest(
        self, body: IO[bytes], name: str, expected_sha256: str | None = None
    ) -> Deferred[Artifact]:
        """Store the rest of ``body`` (read from the current position) as ``name``."""
        return self._thread(self._ingest, body, name, expected_sha256)

    def get(self, artifact_id: str) -> Deferred[Artifact]:
        return self._thread(self._get, artifact_id)

    def list_all(self) -> Deferred[list[Artifact]]:
        return self._thread(self._list)

    def delete(self, artifact_id: str) -> Deferred[None]:
        return self._thread(self._delete, artifact_id)

    def path(self, artifact_id: str) -> str:
        """Where the bytes of a (checked) id live; does not check existence."""
        if not SHA256_RE.match(artifact_id):
            raise ArtifactNotFound(f"there is no artifact {artifact_id!r}")
        return os.path.join(self.root, artifact_id)

    # -- in the worker thread -------------------------------------------------

    def _thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _ensure_dirs(self) -> None:
        os.makedirs(self._incoming, mode=0o700, exist_ok=True)

    def _ingest(self, body: IO[bytes], name: str, expected: str | None) -> Artifact:
        check_name(name)
        if expected is not None:
            expected = check_sha256(expected)
        self._ensure_dirs()
        digest = hashlib.sha256()
        size = 0
        try:
            fd, tmp = tempfile.mkstemp(dir=self._incoming, prefix="upload-")
        except OSError as e:
            raise self._os_error(e, "cannot start the upload") from None
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = body.read(COPY_CHUNK)
                        if not chunk:
                            break
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise ArtifactTooLarge(
                                f"the artifact is over the limit of {self.max_bytes} bytes "
                                "(setting artifact_max_bytes)"
                            )
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as e:
                raise self._os_error(e, "cannot write the artifact") from None
            sha = digest.hexdigest()
            if expected is not None and sha != expected:
                raise ArtifactMismatch(
                    f"sha256 mismatch: the upload hashes to {sha}, not {expected}"
                )
            self._check_dgst_pair(name, sha, tmp)
            final = os.path.join(self.root, sha)
            known = self._existing_meta(sha)
            try:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                art = known or Artifact(sha, name, size, self._now())
                if known is None:
                    self._write_meta(art)
                _fsync_dir(self.root)
            except OSError as e:
                if known is None:
                    _unlink_quietly(final)
                raise self._os_error(e, "cannot store the artifact") from None
            self.log.info(
                "artifact {id} stored ({name}, {size} bytes)", id=sha, name=name, size=size
            )
            return art
        finally:
            _unlink_quietly(tmp)

    def _check_dgst_pair(self, name: str, sha: str, tmp: str) -> None:
        """An archive must match a ``<name>.dgst`` already stored, and a ``.dgst``
        upload must match the archive ``<name minus .dgst>`` already stored."""
        arts = self._list()
        if name.endswith(DGST_SUFFIX):
            with open(tmp, "rb") as f:
                text = f.read(64 * 1024).decode("utf-8", "replace")
            want = parse_dgst(text)
            archive = name[: -len(DGST_SUFFIX)]
            for a in arts:
                if a.name == archive and a.id != want:
                    raise ArtifactMismatch(
                        f"{name} says sha256 {want}, but the stored {archive} is {a.id}"
                    )
            return
        for a in arts:
            if a.name == name + DGST_SUFFIX:
                with open(os.path.join(self.root, a.id), "rb") as f:
                    want = parse_dgst(f.read(64 * 1024).decode("utf-8", "replace"))
                if want != sha:
                    raise ArtifactMismatch(
                        f"sha256 mismatch: the upload hashes to {sha}, but {a.name} says {want}"
                    )

    def _existing_meta(self, sha: str) -> Artifact | None:
        try:
            return self._get(sha)
        except ArtifactNotFound:
            return None

    def _write_meta(self, art: Artifact) -> None:
        data = json.dumps(
            {"name": art.name, "size": art.size, "created_at": art.created_at}
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self._incoming, prefix="meta-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.root, art.id + ".json"))
        finally:
            _unlink_quietly(tmp)

    def _get(self, artifact_id: str) -> Artifact:
        if not isinstance(artifact_id, str) or not SHA256_RE.match(artifact_id):
            raise ArtifactNotFound(f"there is no artifact {artifact_id!r}")
        try:
            with open(os.path.join(self.root, artifact_id + ".json"), "rb") as f:
                meta = json.loads(f.read())
            st = os.stat(os.path.join(self.root, artifact_id))
        except (OSError, ValueError):
            raise ArtifactNotFound(f"there is no artifact {artifact_id}") from None
        return Artifact(artifact_id, str(meta["name"]), st.st_size, float(meta["created_at"]))

    def _list(self) -> list[Artifact]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if SHA256_RE.match(n):
                try:
                    out.append(self._get(n))
                except ArtifactNotFound:
                    continue
        out.sort(key=lambda a: (a.created_at, a.id))
        return out

    def _delete(self, artifact_id: str) -> None:
        self._get(artifact_id)
        # Metadata first: a crash in between leaves bytes without metadata,
        # which list/get ignore.
        _unlink_quietly(os.path.join(self.root, artifact_id + ".json"))
        _unlink_quietly(os.path.join(self.root, artifact_id))
        self.log.info("artifact {id} deleted", id=artifact_id)

    def _os_error(self, e: OSError, what: str) -> ArtifactError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ArtifactStoreFull(f"{what}: no space left in the daemon's data dir")
        return ArtifactError(f"{what}: {os.strerror(e.errno or 0)}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
