# -*- test-case-name: tests.agent.test_deploytool -*-
"""The deployment tool on the agent: install a pushed archive atomically
(``sync_deployment_tool``, docs/protocol.md) and read its VERSION.

The archive comes inline (base64 in the call, older daemons) or, since the
artifact cache, from ``<cache_dir>/<sha256>`` where ``put_artifact_chunk``
left it verified; either way its hash is checked again here.

The archive is a ``.tar.gz`` of the deployment-tool tree with members relative
to the tree's root (``VERSION``, ``playbooks/ping.yml``, ...; a leading ``./``
or one common top directory holding ``VERSION`` is accepted and stripped).

Install steps, all in a worker thread (tar and fsync are blocking work):
1. under an exclusive lock file beside the tree, skip if the installed
   ``VERSION`` and archive hash (``.myx-archive-sha256`` inside the tree) match;
2. check the archive's SHA-256;
3. extract into ``.<name>.new-<random>`` beside ``deployment_tool_dir``:
   only regular files, directories and symlinks that resolve inside the tree;
   no absolute names, no ``..``, no hard links or devices; sizes capped.
   Files and directories come first, symlinks last, and every symlink is
   checked with realpath, so nothing is ever written outside the new tree;
4. swap the new tree into place with ``renameat2(RENAME_EXCHANGE)`` (a reader
   sees the old tree or the new one, never neither), or, where the filesystem
   cannot exchange, with two renames; then delete the old tree.

What it must never do: block the reactor, write outside the new tree while
extracting, leave a half-extracted tree in place of a working one, or trust
owner/mode bits from the archive (files become 0644, or 0755 if executable).
"""

import errno
import hmac
import io
import os
import re
import shutil
import uuid
import zlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from myx_agent.errors import INVALID_PARAMS, SYNC_FAILED, RPCError
from myx_agent.imports import sha256 as fast_sha256

if TYPE_CHECKING:
    # Imported where an archive is read: the idle agent never needs it.
    import tarfile

HASH_FILE = ".myx-archive-sha256"
VERSION_FILE = "VERSION"
MAX_MEMBERS = 20000
MAX_TOTAL_BYTES = 256 << 20
# An archive read from the artifact cache is read whole into memory.
MAX_ARCHIVE_BYTES = 256 << 20
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}\Z")

_log = Logger(namespace="myx_agent.deploytool")


def read_deployment_tool_version(deployment_tool_dir: str) -> Optional[str]:
    """The stripped content of ``<deployment_tool_dir>/VERSION``, or None."""
    try:
        with open(os.path.join(deployment_tool_dir, VERSION_FILE), "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    version = data.decode("utf-8", "replace").strip()
    return version or None


def _read_hash(deployment_tool_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(deployment_tool_dir, HASH_FILE), "rb") as f:
            return f.read(256).decode("ascii", "replace").strip().lower()
    except OSError:
        return None


def sync_deployment_tool(
    deployment_tool_dir: str,
    archive: Optional[bytes],
    sha256: str,
    version: str,
    *,
    reactor: Optional[Any] = None,
    cache_dir: Optional[str] = None,
) -> "Deferred[Dict[str, Any]]":
    """Install ``archive`` as the deployment tool unless this version and hash
    are already installed. With ``archive`` None it is read from
    ``<cache_dir>/<sha256>`` (-32602 if it is not there). Fires ``{"changed":
    bool, "version": str}``; errbacks with RPCError -32010 when the archive is
    rejected."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    the_reactor: Any = reactor
    return deferToThreadPool(
        the_reactor,
        the_reactor.getThreadPool(),
        _sync,
        os.path.abspath(deployment_tool_dir),
        archive,
        sha256,
        version,
        cache_dir,
    )


def _reject(reason: str) -> RPCError:
    return RPCError(SYNC_FAILED, "deployment-tool archive rejected: " + reason)


def _read_cached(cache_dir: Optional[str], sha256: str) -> bytes:
    """The archive ``put_artifact_chunk`` left in the cache (it was verified there)."""
    missing = RPCError(
        INVALID_PARAMS,
        f"invalid params: sha256: no artifact {sha256} in the agent's cache; "
        "push it with put_artifact_chunk first, or pass archive",
    )
    if cache_dir is None:
        raise missing
    path = os.path.join(cache_dir, sha256)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_ARCHIVE_BYTES:
                raise _reject(f"more than {MAX_ARCHIVE_BYTES} bytes compressed")
            data = f.read(MAX_ARCHIVE_BYTES + 1)
    except FileNotFoundError:
        raise missing from None
    try:
        os.utime(path)  # a use, for the cache's least-recently-used eviction
    except OSError:
        pass
    return data


def _sync(
    dt_dir: str,
    archive: Optional[bytes],
    sha256: str,
    version: str,
    cache_dir: Optional[str] = None,
) -> Dict[str, Any]:
    import fcntl

    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise RPCError(INVALID_PARAMS, "invalid params: sha256 must be 64 hex digits")
    if not isinstance(version, str) or not version.strip() or "\0" in version:
        raise RPCError(INVALID_PARAMS, "invalid params: version must be a non-empty string")
    if archive is not None and not isinstance(archive, (bytes, bytearray)):
        raise RPCError(INVALID_PARAMS, "invalid params: archive must be bytes")
    sha256 = sha256.lower()
    version = version.strip()
    parent, name = os.path.split(dt_dir.rstrip("/"))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    lock_fd = os.open(os.path.join(parent, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if read_deployment_tool_version(dt_dir) == version and _read_hash(dt_dir) == sha256:
            return {"changed": False, "version": version}
        if archive is None:
            archive = _read_cached(cache_dir, sha256)
        actual = fast_sha256(archive).hexdigest()
        if not hmac.compare_digest(actual, sha256):
            raise _reject(f"sha256 mismatch (archive is {actual})")
        _remove_stale(parent, name)
        new = os.path.join(parent, f".{name}.new-{uuid.uuid4().hex}")
        os.mkdir(new, 0o755)
        try:
            _extract(bytes(archive), new)
            found = read_deployment_tool_version(new)
            if found is None:
                raise _reject("no VERSION file at the top of the tree")
            if found != version:
                raise _reject(f"VERSION in the archive is {found!r}, expected {version!r}")
            _write_synced(os.path.join(new, HASH_FILE), (sha256 + "\n").encode())
            _fsync_dir(new)
            _swap(new, dt_dir)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
    finally:
        os.close(lock_fd)
    _log.info("deployment tool {version} installed in {path}", version=version, path=dt_dir)
    return {"changed": True, "version": version}


def _remove_stale(parent: str, name: str) -> None:
    """Trees left by a sync that died half-way (we hold the lock)."""
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.new-") or entry.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(root: str, path: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


def _member_parts(member: "tarfile.TarInfo") -> List[str]:
    name = member.name
    if name.startswith("/"):
        raise _reject(f"absolute member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _reject(f"member name with '..': {name!r}")
    if "\0" in name:
        raise _reject("member name with NUL")
    return parts


_Members = List[Tuple[List[str], "tarfile.TarInfo"]]


def _read_members(archive: bytes) -> Tuple["tarfile.TarFile", _Members]:
    import tarfile

    try:
        tf = tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _reject(f"not a valid .tar.gz ({e})") from None
    members: _Members = []
    total = 0
    try:
        for member in tf:
            if len(members) >= MAX_MEMBERS:
                raise _reject(f"more than {MAX_MEMBERS} members")
            if not (member.isreg() or member.isdir() or member.issym()):
                raise _reject(
                    f"unsupported member type for {member.name!r} "
                    "(only files, directories and symlinks)"
                )
            parts = _member_parts(member)
            if member.isreg():
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise _reject(f"more than {MAX_TOTAL_BYTES} bytes uncompressed")
            if not parts:
                if member.isdir():
                    continue
                raise _reject(f"member {member.name!r} has no name")
            members.append((parts, member))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        tf.close()
        raise _reject(f"corrupt archive ({e})") from None
    except BaseException:
        tf.close()
        raise
    # Accept one wrapping directory (``deployment-tool/VERSION``) as well.
    tops = {parts[0] for parts, _ in members}
    if (
        len(tops) == 1
        and not any(parts == [VERSION_FILE] for parts, _ in members)
        and any(len(parts) == 2 and parts[1] == VERSION_FILE for parts, _ in members)
    ):
        members = [(parts[1:], m) for parts, m in members if len(parts) > 1]
    return tf, members


def _extract(archive: bytes, root: str) -> None:
    import tarfile

    root = os.path.realpath(root)
    tf, members = _read_members(archive)
    try:
        # Pass 1: directories and files. No symlink exists yet, and names hold
        # no '..', so every path here is inside root.
        for parts, member in members:
            path = os.path.join(root, *parts)
            try:
                if member.isdir():
                    os.makedirs(path, mode=0o755, exist_ok=True)
                elif member.isreg():
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    mode = 0o755 if member.mode & 0o111 else 0o644
                    src = tf.extractfile(member)
                    if src is None:
                        raise _reject(f"cannot read member {member.name!r}")
                    _write_synced(path, src.read(), mode)
            except FileExistsError:
                raise _reject(f"duplicate or conflicting member {member.name!r}") from None
            except NotADirectoryError:
                raise _reject(f"member {member.name!r} is below a file") from None
        # Pass 2: symlinks, each created only where its parent resolves inside
        # root and kept only if it resolves inside root itself.
        for parts, member in members:
            if not member.issym():
                continue
            target = member.linkname
            if not target or os.path.isabs(target) or "\0" in target:
                raise _reject(f"symlink {member.name!r} points to an absolute path")
            lexical = os.path.normpath(os.path.join(os.path.dirname("/".join(parts)), target))
            if lexical == ".." or lexical.startswith("../"):
                raise _reject(f"symlink {member.name!r} leaves the tree")
            path = os.path.join(root, *parts)
            parent = os.path.dirname(path)
            os.makedirs(parent, mode=0o755, exist_ok=True)
            if not _inside(root, os.path.realpath(parent)):
                raise _reject(f"symlink {member.name!r} is below a link that leaves the tree")
            try:
                os.symlink(target, path)
            except FileExistsError:
                raise _reject(f"duplicate or conflicting member {member.name!r}") from None
        for parts, member in members:
            if member.issym():
                path = os.path.join(root, *parts)
                if not _inside(root, os.path.realpath(path)):
                    raise _reject(f"symlink {member.name!r} leaves the tree")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise _reject(f"corrupt archive ({e})") from None
    finally:
        tf.close()


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths; False where the kernel or filesystem cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _swap(new: str, dt_dir: str) -> None:
    parent, name = os.path.split(dt_dir)
    if not os.path.lexists(dt_dir):
        os.rename(new, dt_dir)
        _fsync_dir(parent)
        return
    if _rename_exchange(new, dt_dir):
        # ``new`` now holds the old tree.
        _fsync_dir(parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    os.rename(dt_dir, old)
    try:
        os.rename(new, dt_dir)
    except BaseException:
        os.rename(old, dt_dir)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
