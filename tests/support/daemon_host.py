"""MyX installed on a systemd test host the way docs/operations.md says: /opt/myx/venv.

The test hosts have no package index, so the daemon's dependencies come as a
wheelhouse built here for the host's Python and platform: the installer's own
``Wheelhouse`` (myxd/install/bundle.py, ``pip download --only-binary``), fed
with the ``Requires-Dist`` lines of the wheel under test and cached under the
test cache dir. The wheel is the one scripts/test built for this run
(tests/support/installed.py), so the host runs exactly what the suite tests.

Also reads docs/operations.md's blocks, so the tests run the documented
commands rather than a copy of them.

Never writes outside the host's root, the test cache dir and its own temp dir.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import zipfile
from typing import Any

from twisted.internet import threads
from twisted.internet.task import deferLater
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from myxd.install.bundle import TargetPlatform, Wheelhouse
from tests.support import installed
from tests.support.testhost import CACHE_DIR, TestHost

VENV = "/opt/myx/venv"
WHEELS_IN_HOST = "/root/myx-wheels"
UNIT_FILE = os.path.join(installed.REPO_ROOT, "packaging", "myxd.service")
OPERATIONS_MD = os.path.join(installed.REPO_ROOT, "docs", "operations.md")
DAEMON_WHEELHOUSE = os.path.join(CACHE_DIR, "daemon-wheelhouse")


def myx_wheel() -> str:
    """The wheel that the run's venv was installed from (installed.build's layout)."""
    dist = os.path.join(os.path.dirname(installed.venv()), "wheel", "dist")
    try:
        wheels = [n for n in os.listdir(dist) if n.endswith(".whl")]
    except OSError:
        wheels = []
    if len(wheels) != 1:
        raise RuntimeError(f"expected the run's MyX wheel in {dist}, found {wheels}")
    return os.path.join(dist, wheels[0])


def requirements_of(wheel: str) -> bytes:
    """The wheel's runtime ``Requires-Dist`` lines (extras left out), as a requirements file."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode("utf-8")
    reqs = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            reqs.append(line.split(":", 1)[1].strip())
    return ("\n".join(reqs) + "\n").encode()


def docs_block(lang: str, containing: str, path: str = OPERATIONS_MD) -> str:
    """The first fenced ```lang block of the docs that contains ``containing``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for m in re.finditer(rf"(?ms)^```{re.escape(lang)}\n(.*?)^```", text):
        if containing in m.group(1):
            return m.group(1)
    raise AssertionError(f"{path} has no ```{lang} block with {containing!r}")


async def host_target(host: TestHost) -> TargetPlatform:
    out = await host.sh(
        "python3 -c 'import platform; print(platform.python_version(), "
        "platform.machine(), platform.libc_ver()[1])'"
    )
    python, machine, glibc = out.split()
    return TargetPlatform(python, machine, glibc)


async def install_myx(host: TestHost, reactor: Any) -> str:
    """``pip install`` of the run's wheel into /opt/myx/venv on the host, offline.

    Returns the host path of the wheels directory (the wheel and its deps).
    """
    wheel = myx_wheel()
    target = await host_target(host)
    deps = await Wheelhouse(DAEMON_WHEELHOUSE, reactor).ensure(target, requirements_of(wheel))
    dest = os.path.join(host.root, WHEELS_IN_HOST.lstrip("/"))

    def copy() -> None:
        os.makedirs(dest)
        for name in Wheelhouse.wheels(deps):
            shutil.copy(os.path.join(deps, name), dest)
        shutil.copy(wheel, dest)

    await threads.deferToThread(copy)
    host_wheel = f"{WHEELS_IN_HOST}/{os.path.basename(wheel)}"
    # As docs/operations.md says, for a host without the package index.
    await host.sh(
        f"python3 -m venv {VENV} && "
        f"{VENV}/bin/pip install --quiet --no-index --find-links {WHEELS_IN_HOST} {host_wheel} && "
        f"{VENV}/bin/twistd --help >/dev/null",
        timeout=900,
    )
    return WHEELS_IN_HOST


async def sh_status(host: TestHost, script: str, *, timeout: float = 120) -> tuple[int, str]:
    """Run a script as root on the host; returns (exit code, stdout + stderr)."""
    client = await host.ssh()
    try:
        res = await client.run(script, timeout=timeout)
    finally:
        await client.close()
    code = -1 if res.exit_code is None else res.exit_code
    return code, res.stdout_text() + res.stderr_text()


async def wait_remote(host: TestHost, condition: str, *, timeout: int = 120) -> None:
    """Wait (on the host, one SSH call) until the shell ``condition`` holds."""
    code, out = await sh_status(
        host,
        f"timeout {timeout} sh -c " + shlex.quote(f"until {condition}; do sleep 0.3; done"),
        timeout=timeout + 30,
    )
    if code != 0:
        raise AssertionError(f"not true after {timeout} s on {host.name}: {condition} ({out})")


async def unit_props(host: TestHost, unit: str, *names: str) -> dict[str, str]:
    out = await host.sh(f"systemctl show -p {','.join(names)} {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def api_get(reactor: Any, url: str, token: str | None) -> tuple[int, bytes]:
    headers = Headers({b"Accept": [b"application/json"]})
    if token is not None:
        headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
    resp = await Agent(reactor).request(b"GET", url.encode(), headers)
    return resp.code, await readBody(resp)


async def wait_api(reactor: Any, url: str, token: str, *, timeout: float = 120) -> bytes:
    """Poll ``url`` until it answers 200 with the token; returns the body."""
    deadline = reactor.seconds() + timeout
    last: object = None
    while reactor.seconds() < deadline:
        try:
            code, body = await api_get(reactor, url, token)
        except Exception as e:  # not listening yet
            last = e
        else:
            if code == 200:
                return body
            last = code
        await deferLater(reactor, 0.3, lambda: None)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s (last: {last!r})")
