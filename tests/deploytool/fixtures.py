"""Test fixtures for the deployment-tool tests: stand-in Xray release archives.

``build_standin_release`` writes ``Xray-linux-64-<version>.TEST-FIXTURE.zip``
with the official zip's layout (``xray``, ``geoip.dat``, ``geosite.dat``) and a
``.dgst`` beside it in the official format. The ``xray`` inside is the Python
stand-in of ``standin_xray.py.in`` (see its docstring), not Xray. These files
are built at test time into a temp dir; they never go into deployment-tool/.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_xray.py.in")


def build_standin_release(
    out_dir: str, version: str, *, removed_flows: tuple[str, ...] = ()
) -> tuple[str, str, str]:
    """Write the stand-in zip and its .dgst; return ``(zip, dgst, sha256)``."""
    with open(STANDIN) as f:
        script = f.read()
    script = script.replace("@VERSION@", version).replace(
        "@REMOVED_FLOWS@", repr(set(removed_flows) or set())
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"Xray-linux-64-{version}.TEST-FIXTURE.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("xray", date_time=(2024, 1, 1, 0, 0, 0))
        info.external_attr = 0o755 << 16
        zf.writestr(info, script)
        for name in ("geoip.dat", "geosite.dat"):
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), f"TEST FIXTURE {name}\n")
    with open(path, "rb") as f:
        data = f.read()
    sha256 = hashlib.sha256(data).hexdigest()
    dgst = path + ".dgst"
    with open(dgst, "w") as f:
        f.write(
            f"MD5= {hashlib.md5(data).hexdigest()}\n"  # noqa: S324 - the official format
            f"SHA1= {hashlib.sha1(data).hexdigest()}\n"  # noqa: S324
            f"SHA2-256= {sha256}\n"
            f"SHA2-512= {hashlib.sha512(data).hexdigest()}\n"
        )
    return path, dgst, sha256
