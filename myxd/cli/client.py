"""The `myx` CLI's blocking JSON client for the admin API, its errors and output helpers.

The CLI is a short-lived process with no reactor, so plain blocking ``urllib`` is
the right tool here. Never prints the admin token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from myxd.cli.words import explain

DEFAULT_API = "http://127.0.0.1:8470"
DEFAULT_TOKEN_FILE = os.path.join("myxd-data", "admin-token")
# Each follow request waits this long on the daemon for new output (long-poll).
FOLLOW_WAIT = 10.0


class CLIError(Exception):
    """A failure to report as one line, with the process exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """Blocking JSON client for the admin API.

    ``verbose`` (``myx -v``) travels with the client to every command, so error
    texts can add the raw reason (with its JSON-RPC code) after the operator's words.
    """

    def __init__(
        self,
        base: str,
        token: str | Callable[[], str] | None,
        timeout: float = 60.0,
        verbose: bool = False,
    ) -> None:
        self.base = base.rstrip("/")
        # A callable is asked on the first request: a command's own input errors
        # (a missing key file, say) are reported before a missing token.
        self._token = token
        self.timeout = timeout
        self.verbose = verbose

    @property
    def token(self) -> str | None:
        """The admin token, read on first use (also for streamed uploads)."""
        if callable(self._token):
            self._token = self._token()
        return self._token

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        token = self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise CLIError(_api_error(e.code, e.read(), self.verbose)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CLIError(f"cannot reach myxd at {self.base}: {reason}", 3) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CLIError(
                f"myxd answered {method} {path} with something that is not JSON", 3
            ) from None


def _api_error(status: int, raw: bytes, verbose: bool = False) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        message = str(body["error"])
        if body.get("field"):
            message += f" (field: {body['field']})"
        if body.get("reason") and str(body["reason"]) not in message:
            message += f": {body['reason']}"
    else:
        message = raw.decode("utf-8", "replace").strip()[:200] or "no details"
    if status == 401:
        message += " — check --token / --token-file / MYX_TOKEN"
    return f"myxd refused the request (HTTP {status}): {explain(message, verbose)}"


def _checked_token(value: str, source: str) -> str:
    # It goes into an HTTP header: anything but one word of visible ASCII would
    # make urllib raise with the whole value in its message (a config file
    # given as --token-file, say). Never echo the value.
    if not all("!" <= c <= "~" for c in value):
        raise CLIError(f"{source} does not hold a token (one word of printable ASCII expected)")
    return value


def _read_token(args: argparse.Namespace) -> str:
    """The admin token from --token, MYX_TOKEN or the token file; none is an error
    that says where it looked, before any request is sent."""
    if args.token:
        return _checked_token(str(args.token).strip(), "--token")
    env = os.environ.get("MYX_TOKEN")
    if env and env.strip():
        return _checked_token(env.strip(), "MYX_TOKEN")
    path = args.token_file or DEFAULT_TOKEN_FILE
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        if args.token_file:
            raise CLIError(f"token file {path} does not exist") from None
        token = ""
    except OSError as e:
        raise CLIError(f"cannot read token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"token file {path} is not UTF-8 text") from None
    if not token:
        raise CLIError(
            "no admin token found: looked at --token, the MYX_TOKEN environment variable "
            f"and the file {os.path.abspath(path)} (set with --token-file); myxd writes "
            "it to <data-dir>/admin-token on its first start"
        )
    return _checked_token(token, f"token file {path}")


# -- output helpers --------------------------------------------------------------


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    delta = max(0.0, time.time() - ts)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def _table(rows: Sequence[Sequence[str]], out: Any) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
