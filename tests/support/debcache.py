"""Debian packages for the test hosts, downloaded once and cached like the rootfs.

``preload_debs(host, packages)`` asks apt INSIDE the host which .deb files an
install of ``packages`` needs (``apt-get install --print-uris``: exact file
names, versions, sizes and hashes from the host's own package lists), downloads
the missing ones on this machine with ``apt-get download NAME=VERSION`` into
``<cache>/debs/`` (once; checked against that size and hash, renamed into
place atomically) and copies them into the host's ``/var/cache/apt/archives``.
apt on the host then installs those packages without downloading anything;
``install_debs`` does that install itself (``--no-download``).

Never writes outside the cache dir and the host's root; never installs
anything on this machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil

from twisted.internet import threads

from tests.support.testhost import CACHE_DIR, TestHost, run

DEB_DIR = os.path.join(CACHE_DIR, "debs")
# "'URL' FILE SIZE HASH", HASH being "SHA256:<hex>", "MD5Sum:<hex>" or empty.
_URI_RE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+\.deb) (?P<size>\d+)\s*(?P<hash>\S*)\s*$")
_HASHES = {"sha256": hashlib.sha256, "md5sum": hashlib.md5}


def _digest(path: str, kind: str) -> str:
    h = _HASHES[kind]()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


async def install_debs(host: TestHost, packages: list[str]) -> None:
    """Install ``packages`` on the host from cached .debs (no network on the host)."""
    await preload_debs(host, packages)
    await host.sh(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        "--no-download " + " ".join(packages),
        timeout=600,
    )


async def preload_debs(host: TestHost, packages: list[str]) -> list[str]:
    """Put every .deb that installing ``packages`` needs into the host's apt cache."""
    out = await host.sh(
        "apt-get install --print-uris -qq -y --no-install-recommends " + " ".join(packages)
    )
    wanted = [m.groupdict() for m in map(_URI_RE.match, out.splitlines()) if m]
    os.makedirs(DEB_DIR, exist_ok=True)
    archives = os.path.join(host.root, "var/cache/apt/archives")
    lock_fd = os.open(os.path.join(DEB_DIR, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await threads.deferToThread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        for deb in wanted:
            cached = os.path.join(DEB_DIR, deb["file"])
            if not _exists(cached):
                await _download(host, deb, cached)
            shutil.copy(cached, os.path.join(archives, deb["file"]))
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    return [d["file"] for d in wanted]


def _size(path: str) -> int:
    return os.path.getsize(path)


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def _download(host: TestHost, deb: dict[str, str], cached: str) -> None:
    # File names are NAME_VERSION_ARCH.deb with ':' quoted as %3a.
    name, version, _arch = deb["file"][: -len(".deb")].split("_")
    version = version.replace("%3a", ":")
    tmp = os.path.join(DEB_DIR, f".dl-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        await run(host.reactor, ["/usr/bin/apt-get", "download", f"{name}={version}"], path=tmp)
        got = os.listdir(tmp)
        if len(got) != 1:
            raise RuntimeError(f"apt-get download {name}={version} gave {got}")
        path = os.path.join(tmp, got[0])
        kind, _, want = deb["hash"].lower().partition(":")
        if kind in _HASHES and _digest(path, kind) != want:
            raise RuntimeError(f"{deb['file']}: {kind} differs from the host's package lists")
        if _size(path) != int(deb["size"]):
            raise RuntimeError(f"{deb['file']}: size differs from the host's package lists")
        os.replace(path, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
