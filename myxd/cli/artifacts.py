"""`myx artifacts [upload FILE | delete ID]`: the daemon's artifact store from the CLI.

An upload streams the file: it is hashed once (64 KiB at a time) to skip a file
the daemon already has, then sent as the raw request body by ``http.client``
reading the open file, so a 500 MiB release never sits in memory. On a terminal
the progress goes to stderr. An expected SHA-256 (``--sha256`` or a ``.dgst``
file) is checked here before any byte is sent and again by the daemon (422),
so a mismatch never leaves anything stored.

It never prints the admin token.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.parse
from typing import Any, BinaryIO

from myxd.cli.client import Client, CLIError, _ago, _api_error, _dump, _table

READ_CHUNK = 64 * 1024
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")
# The official Xray .dgst lines: "SHA2-256= <hex>" (also "SHA256 (x) = <hex>"),
# the same forms the daemon's store accepts.
_DGST_LINE = re.compile(r"^\s*(?:SHA2-256|SHA256)\b[^=]*=\s*([0-9a-fA-F]{64})\s*$", re.M)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def file_sha256(path: str) -> tuple[str, int]:
    """(hex digest, size) of the file, read in small pieces."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest(), size


def read_dgst(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError as e:
        raise CLIError(f"cannot read --dgst file {path}: {e.strerror}") from None
    m = _DGST_LINE.search(text)
    if not m:
        raise CLIError(f"--dgst file {path} has no 'SHA2-256= <hex>' line")
    return m.group(1).lower()


class _Progress:
    """A file object for http.client that reports how much was read, on a terminal."""

    def __init__(self, f: BinaryIO, total: int, name: str, out: Any) -> None:
        self._f = f
        self._total = max(total, 1)
        self._name = name
        self._out = out
        self._sent = 0
        self._shown = -1

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sent += len(data)
        percent = self._sent * 100 // self._total
        if self._out is not None and percent != self._shown:
            self._shown = percent
            self._out.write(
                f"\rupload {self._name}: {percent:3d}% "
                f"({human_size(self._sent)} of {human_size(self._total)})"
            )
            self._out.flush()
        return data


def _stored(client: Client, sha: str) -> dict[str, Any] | None:
    try:
        return dict(client.request("GET", f"/api/artifacts/{sha}"))
    except CLIError as e:
        if "HTTP 404" in str(e):
            return None
        raise


def upload(
    client: Client, path: str, expected: str | None = None, name: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Upload ``path`` unless the daemon has its bytes; (artifact, sent)."""
    if not os.path.isfile(path):
        raise CLIError(f"{path} is not a file")
    name = name or os.path.basename(path)
    sha, size = file_sha256(path)
    if expected is not None and expected.lower() != sha:
        raise CLIError(
            f"{path} does not match the expected SHA-256 {expected.lower()} (it is {sha})"
        )
    found = _stored(client, sha)
    if found is not None:
        return found, False
    query = urllib.parse.urlencode({"name": name, "sha256": sha})
    return _post_file(client, f"/api/artifacts?{query}", path, size, name), True


def _post_file(client: Client, target: str, path: str, size: int, name: str) -> dict[str, Any]:
    url = urllib.parse.urlsplit(client.base)
    conn_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    prefix = url.path.rstrip("/")
    conn = conn_type(
        url.hostname or "127.0.0.1", url.port, timeout=client.timeout, blocksize=READ_CHUNK
    )
    out = sys.stderr if sys.stderr.isatty() else None
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
        "Accept": "application/json",
    }
    if client.token:
        headers["Authorization"] = f"Bearer {client.token}"
    try:
        with open(path, "rb") as f:
            conn.request(
                "POST", prefix + target, body=_Progress(f, size, name, out), headers=headers
            )
            resp = conn.getresponse()
            raw = resp.read()
    except OSError as e:
        raise CLIError(f"cannot reach myxd at {client.base}: {e.strerror or e}", 3) from None
    except http.client.HTTPException as e:
        raise CLIError(f"myxd broke off the upload: {type(e).__name__}", 3) from None
    finally:
        conn.close()
        if out is not None:
            out.write("\n")
    if resp.status != 201:
        raise CLIError(_api_error(resp.status, raw, client.verbose))
    try:
        return dict(json.loads(raw))
    except ValueError:
        raise CLIError("myxd answered the upload with something that is not JSON", 3) from None


def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    expected = None
    if args.sha256 is not None:
        if not _HEX64.match(args.sha256):
            raise CLIError("--sha256 must be 64 hexadecimal characters")
        expected = args.sha256
    elif args.dgst is not None:
        expected = read_dgst(args.dgst)
    art, sent = upload(client, args.file, expected, args.name)
    if args.json:
        _dump({**art, "uploaded": sent})
    else:
        how = "uploaded" if sent else "already stored"
        print(f"{art['id']}  {art['name']}  {human_size(int(art['size']))}  ({how})")
    return 0


def cmd_artifacts(client: Client, args: argparse.Namespace) -> int:
    arts = client.request("GET", "/api/artifacts")["artifacts"]
    if args.json:
        _dump(arts)
        return 0
    rows = [["ID", "NAME", "SIZE", "CREATED"]]
    for a in arts:
        rows.append([a["id"], a["name"], human_size(int(a["size"])), _ago(a.get("created_at"))])
    _table(rows, sys.stdout)
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/api/artifacts/{args.id}")
    print(f"artifact {args.id} deleted")
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("artifacts", help="list, upload or delete artifacts (release archives)")
    s.add_argument("--json", action="store_true", help="rows as JSON")
    s.set_defaults(func=cmd_artifacts)
    inner = s.add_subparsers(dest="artifacts_cmd", metavar="ACTION")
    u = inner.add_parser("upload", help="upload a file (skipped if its bytes are stored)")
    u.add_argument("file")
    u.add_argument("--name", help="the name to store (default: the file's name)")
    check = u.add_mutually_exclusive_group()
    check.add_argument("--sha256", metavar="HEX", help="refuse the file unless it has this SHA-256")
    check.add_argument("--dgst", metavar="FILE", help="an Xray .dgst file holding the SHA-256")
    u.add_argument("--json", action="store_true", help="the stored artifact as JSON")
    u.set_defaults(func=cmd_upload)
    d = inner.add_parser("delete", help="delete an artifact")
    d.add_argument("id")
    d.set_defaults(func=cmd_delete)
