"""MyX as a user gets it: the wheel, installed in a venv of its own.

Every daemon (twistd), agent and ``myx`` process that the tests start runs from
this venv, with the checkout NOT on ``sys.path`` (no PYTHONPATH, cwd elsewhere),
so a file missing from the wheel fails the suite instead of being found in the
source tree. In-process unit tests still import the checkout.

``scripts/test`` builds the venv once per run (``build()``) and exports its path
as ``MYX_TEST_VENV``; ``venv()`` reads it, or builds one for this process when
a test module is run by plain ``trial``.

How the venv gets its dependencies: ``pip install --no-deps`` of the wheel, and
one ``.pth`` line pointing at a *view* of the outer interpreter's
site-packages -- a directory of symlinks to every entry there EXCEPT MyX's own
files (myxd, myx_agent, myx_deployment_tool, the twistd plugin, dist-info and
any editable-install hook). That is offline and takes about a second, where
installing twisted, ansible-core and cryptography again would take minutes and
need the package index; and unlike a plain ``.pth`` to site-packages, a package
missing from the wheel cannot be found in the outer install either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_VAR = "MYX_TEST_VENV"
# Top-level names of the MyX distribution in site-packages.
MYX_TOP_LEVEL = ("myxd", "myx_agent", "myx_deployment_tool")
PLUGIN_FILE = "myxd_plugin.py"
IGNORED_IN_COPY = (
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "_trial_temp*",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    "dropin.cache",
    "myxd-data",
)
TWISTD_SCRIPT = """#!{python}
import sys
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
sys.exit(run())
"""

_built: Optional[str] = None


def clean_env(venv_dir: Optional[str] = None, **extra: str) -> Dict[str, str]:
    """This process's environment without PYTHON*/PIP_* variables, venv/bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.pop("VIRTUAL_ENV", None)
    if venv_dir is not None:
        env["PATH"] = os.pathsep.join([os.path.join(venv_dir, "bin"), env.get("PATH", "")])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra)
    return env


def _run(argv: List[str], cwd: str) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def build_wheel(out_dir: str, source: str = REPO_ROOT) -> str:
    """``pip wheel --no-deps`` of a clean copy of ``source``; returns the wheel's path.

    The copy keeps a stale build/ dir of the checkout (setuptools reuses it and
    would ship files deleted since) out of the wheel.
    """
    src = os.path.join(out_dir, "src")
    shutil.copytree(source, src, ignore=shutil.ignore_patterns(*IGNORED_IN_COPY), symlinks=True)
    dist = os.path.join(out_dir, "dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, src], out_dir)
    wheels = [n for n in os.listdir(dist) if n.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {dist}, found {wheels}")
    shutil.rmtree(src)
    return os.path.join(dist, wheels[0])


def _myx_files_outside() -> set:
    """Paths (relative to site-packages) of an outer MyX install, from its RECORD."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        files = distribution("myx").files or []
    except PackageNotFoundError:
        return set()
    return {str(f).replace(os.sep, "/") for f in files}


def _make_deps_view(view: str, site: str) -> None:
    """Symlinks to ``site``'s entries, minus everything of MyX itself."""
    owned = _myx_files_outside()
    owned_top = {p.split("/")[0] for p in owned}
    os.makedirs(view)
    for name in sorted(os.listdir(site)):
        path = os.path.join(site, name)
        if name in MYX_TOP_LEVEL or name.endswith(".pth") or name.startswith("__editable__"):
            continue
        if name.startswith("myx-") and name.endswith((".dist-info", ".egg-info")):
            continue
        if name == "twisted" and os.path.isdir(path):
            _view_of_twisted(os.path.join(view, name), path)
            continue
        if name in owned_top and not os.path.isdir(path):
            continue
        os.symlink(path, os.path.join(view, name))


def _view_of_twisted(dest: str, twisted_dir: str) -> None:
    # twisted/plugins holds MyX's plugin file next to Twisted's own plugins.
    os.makedirs(dest)
    for name in os.listdir(twisted_dir):
        src = os.path.join(twisted_dir, name)
        if name != "plugins":
            os.symlink(src, os.path.join(dest, name))
            continue
        plugins = os.path.join(dest, "plugins")
        os.makedirs(plugins)
        for plugin in os.listdir(src):
            if plugin in (PLUGIN_FILE, "dropin.cache", "__pycache__"):
                continue
            os.symlink(os.path.join(src, plugin), os.path.join(plugins, plugin))


def purelib(venv_dir: str) -> str:
    """The venv's site-packages (same layout as this interpreter's)."""
    rel = os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix)
    return os.path.join(venv_dir, rel)


def install_wheel(wheel: str, venv_dir: str) -> str:
    """A venv at ``venv_dir`` holding ``wheel`` (deps through the view); returns it."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv_dir], os.path.dirname(venv_dir))
    site = purelib(venv_dir)
    if not os.path.isdir(site):
        raise RuntimeError(f"{site} was not created by venv")
    view = os.path.join(venv_dir, "deps-view")
    _make_deps_view(view, sysconfig.get_paths()["purelib"])
    with open(os.path.join(site, "_myx_test_deps.pth"), "w") as f:
        f.write(view + "\n")
    python = os.path.join(venv_dir, "bin", "python")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            wheel,
        ],
        venv_dir,
    )
    _copy_dependency_scripts(os.path.join(venv_dir, "bin"), python)
    return venv_dir


def _copy_dependency_scripts(bin_dir: str, python: str) -> None:
    """The deps' console scripts (twistd, ansible-playbook, ...) for this venv's python.

    The agent runs the ansible-playbook next to its interpreter, as it does in
    the venv the installer builds on a target.
    """
    outer_bin = os.path.dirname(sys.executable)
    # Scripts whose first line runs a python of the outer venv.
    shebang = f"#!{outer_bin}/python".encode()
    for name in sorted(os.listdir(outer_bin)):
        dest = os.path.join(bin_dir, name)
        src = os.path.join(outer_bin, name)
        if os.path.exists(dest) or name in ("myx", "myx-agent") or not os.path.isfile(src):
            continue
        with open(src, "rb") as f:
            first = f.readline()
            if not first.startswith(shebang):
                continue
            body = f.read()
        with open(dest, "wb") as f:
            f.write(f"#!{python}\n".encode() + body)
        os.chmod(dest, 0o755)  # noqa: S103 - an executable script
    twistd = os.path.join(bin_dir, "twistd")
    if not os.path.exists(twistd):
        with open(twistd, "w") as f:
            f.write(TWISTD_SCRIPT.format(python=python))
        os.chmod(twistd, 0o755)  # noqa: S103 - an executable script


def build(root: Optional[str] = None, source: str = REPO_ROOT) -> str:
    """Build the wheel of ``source`` and install it into ``<root>/venv``; returns the venv."""
    root = root or tempfile.mkdtemp(prefix="myx-test-venv-")
    wheel = build_wheel(os.path.join(root, "wheel"), source)
    return install_wheel(wheel, os.path.join(root, "venv"))


def venv() -> str:
    """The venv with the installed MyX: ``$MYX_TEST_VENV``, else built once per process."""
    global _built
    configured = os.environ.get(ENV_VAR)
    if configured:
        if not os.path.isfile(os.path.join(configured, "bin", "python")):
            raise RuntimeError(f"{ENV_VAR}={configured} is not a venv (no bin/python)")
        return configured
    if _built is None:
        _built = build()
    return _built


def venv_python(venv_dir: str) -> str:
    return os.path.join(venv_dir, "bin", "python")


def python() -> str:
    return venv_python(venv())


def script(name: str) -> str:
    """A console script of the installed package (myx, myx-agent) or the twistd wrapper."""
    return os.path.join(venv(), "bin", name)


def env(**extra: str) -> Dict[str, str]:
    """Environment for a process of the installed MyX: no PYTHONPATH, venv/bin on PATH."""
    return clean_env(venv(), **extra)


def main() -> int:
    """``python -m tests.support.installed [DIR]``: build the venv, print its path."""
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
