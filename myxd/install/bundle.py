"""What an install uploads: the agent's files, its wheelhouse, the deployment tool.

- ``agent_files()``: the modules of the ``myx_agent`` package that the agent
  actually imports, found by walking the import statements (AST, including
  imports inside functions) from its entry points ``__main__``/``main``, plus
  ``requirements.txt``. Computed from the package, never listed by hand.
- ``Wheelhouse``: wheels for the TARGET's Python and platform, fetched with
  ``pip download --only-binary=:all: --python-version X.Y --platform ...`` (run
  with spawnProcess, never blocking the reactor) and cached in
  ``<data_dir>/wheelhouse/<cpXY>-<arch>-glibc<M.N>``, keyed by the requirements'
  hash; concurrent requests for one key share one download.
- ``deployment_tool_archive()``: a deterministic tar.gz of the deployment tool
  (sorted members, fixed mtimes and owners), so its sha256 only changes when a
  file does, and an unchanged tool is skipped on the agent. The default tool is
  the source tree's ``deployment-tool/``, installed as the package
  ``myx_deployment_tool``; the ``deployment_tool_dir`` setting names another.

Everything is found in the INSTALLED packages (``importlib.util.find_spec``),
never in a source checkout. Never imports myx_agent (it only reads its source)
and never writes outside the wheelhouse cache dir.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.errors import MyxError

AGENT_PACKAGE = "myx_agent"
# deployment-tool/ of the source tree, shipped under an importable name.
DEPLOYMENT_TOOL_PACKAGE = "myx_deployment_tool"
ENTRY_MODULES = ("__init__", "__main__", "main")


class BundleError(MyxError):
    """The agent bundle, wheelhouse or deployment tool cannot be built."""


def _package_dir(name: str) -> str:
    """Directory of the installed package ``name``, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BundleError(f"the package {name} is not installed: reinstall MyX")
    # A namespace package (myx_deployment_tool has no __init__.py) may have
    # several portions on sys.path; the first one is the one Python would use.
    return os.path.abspath(locations[0])


def agent_package_dir() -> str:
    """The installed ``myx_agent`` package: its modules and requirements.txt."""
    return _package_dir(AGENT_PACKAGE)


def packaged_deployment_tool_dir() -> str:
    """The deployment tool shipped in the package ``myx_deployment_tool``."""
    return _package_dir(DEPLOYMENT_TOOL_PACKAGE)


def deployment_tool_dir() -> str:
    """The packaged deployment tool (the default of the ``deployment_tool_dir`` setting)."""
    return packaged_deployment_tool_dir()


def check_deployment_tool_dir(path: str) -> str:
    """``path`` as an absolute dir that looks like a deployment tool, or a one-line error."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise BundleError(f"{path} is not a directory")
    if not os.path.isdir(os.path.join(path, "playbooks")):
        raise BundleError(f"{path} has no playbooks/ directory: not a deployment tool")
    deployment_tool_version(path)
    return path


def _module_path(pkg_dir: str, module: str) -> str | None:
    """File of ``myx_agent.<module>`` (dotted below the package), if it exists."""
    rel = module.replace(".", os.sep)
    for cand in (os.path.join(pkg_dir, rel + ".py"), os.path.join(pkg_dir, rel, "__init__.py")):
        if os.path.isfile(cand):
            return cand
    return None


def _imports_of(path: str, module: str, pkg_dir: str) -> set[str]:
    """Modules of the package imported by ``module`` (names relative to the package)."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    is_pkg = os.path.basename(path) == "__init__.py"
    here = module.split(".") if module != "__init__" else []
    if not is_pkg:
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == AGENT_PACKAGE:
                    for i in range(2, len(parts) + 1):
                        found.add(".".join(parts[1:i]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                base_parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == AGENT_PACKAGE:
                base_parts = node.module.split(".")[1:]
            else:
                continue
            for i in range(1, len(base_parts) + 1):
                found.add(".".join(base_parts[:i]))
            # ``from myx_agent import x``: x may be a submodule or a name.
            for alias in node.names:
                name = ".".join(base_parts + [alias.name]) if base_parts else alias.name
                if _module_path(pkg_dir, name):
                    found.add(name)
    return {m for m in found if m}


def agent_modules(pkg_dir: str | None = None) -> list[str]:
    """Relative paths (``myx_agent/x.py``) of every package module the agent imports."""
    pkg_dir = pkg_dir or agent_package_dir()
    todo = [m for m in ENTRY_MODULES if _module_path(pkg_dir, m)]
    if "main" not in todo and "__main__" not in todo:
        raise BundleError(f"{pkg_dir}: no main.py or __main__.py: not the agent package")
    seen: dict[str, str] = {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_path(pkg_dir, mod)
        if path is None:
            raise BundleError(f"the agent imports {AGENT_PACKAGE}.{mod}, which does not exist")
        seen[mod] = path
        for sub in _imports_of(path, mod, pkg_dir):
            if sub not in seen:
                todo.append(sub)
        # A submodule's package __init__ runs first on import.
        parts = mod.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in seen and _module_path(pkg_dir, parent):
                todo.append(parent)
    rels = {
        os.path.join(AGENT_PACKAGE, os.path.relpath(p, pkg_dir)).replace(os.sep, "/")
        for p in seen.values()
    }
    return sorted(rels)


@dataclass(frozen=True)
class AgentFiles:
    """Files to place under /opt/myx-agent, as (relative path, bytes)."""

    files: tuple[tuple[str, bytes], ...]
    requirements: bytes

    @property
    def requirements_sha256(self) -> str:
        return hashlib.sha256(self.requirements).hexdigest()

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for rel, data in self.files:
            h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


def agent_files(pkg_dir: str | None = None) -> AgentFiles:
    """Read the agent's modules and requirements.txt (small files; a few ms)."""
    pkg_dir = pkg_dir or agent_package_dir()
    req_path = os.path.join(pkg_dir, "requirements.txt")
    if not os.path.isfile(req_path):
        raise BundleError(f"{req_path} is missing: the agent's dependencies are unknown")
    out: list[tuple[str, bytes]] = []
    for rel in agent_modules(pkg_dir):
        with open(os.path.join(os.path.dirname(pkg_dir), rel), "rb") as f:
            out.append((rel, f.read()))
    with open(req_path, "rb") as f:
        requirements = f.read()
    out.append(("requirements.txt", requirements))
    return AgentFiles(files=tuple(out), requirements=requirements)


def deployment_tool_version(tool_dir: str | None = None) -> str:
    tool_dir = tool_dir or deployment_tool_dir()
    try:
        with open(os.path.join(tool_dir, "VERSION")) as f:
            version = f.read().strip()
    except OSError:
        raise BundleError(f"{tool_dir}/VERSION is missing") from None
    if not version:
        raise BundleError(f"{tool_dir}/VERSION is empty")
    return version


def deployment_tool_archive(tool_dir: str | None = None) -> tuple[bytes, str, str]:
    """``(tar.gz bytes, sha256 hex, VERSION)`` of the deployment tool, reproducibly.

    Members are relative, sorted, owned by root, with mtime 0; symlinks and
    special files are refused (the agent would refuse them too).
    """
    tool_dir = tool_dir or deployment_tool_dir()
    version = deployment_tool_version(tool_dir)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(tool_dir):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", ".git"))
            rel_dir = os.path.relpath(dirpath, tool_dir)
            entries = [(d, True) for d in dirnames] + [(f, False) for f in sorted(filenames)]
            for name, is_dir in entries:
                if name.endswith((".pyc", ".retry")):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
                if os.path.islink(full):
                    raise BundleError(f"deployment-tool/{rel} is a symlink; not allowed")
                info = tarfile.TarInfo(rel)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    continue
                if not os.path.isfile(full):
                    raise BundleError(f"deployment-tool/{rel} is not a regular file")
                with open(full, "rb") as f:
                    data = f.read()
                info.size = len(data)
                info.mode = 0o755 if os.access(full, os.X_OK) else 0o644
                tar.addfile(info, io.BytesIO(data))
    # gzip with mtime 0 so that identical trees give identical bytes.
    archive = gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)
    return archive, hashlib.sha256(archive).hexdigest(), version


@dataclass(frozen=True)
class TargetPlatform:
    """What the target runs, from the install's check step."""

    python: str  # "3.11.2"
    machine: str  # uname -m: x86_64, aarch64
    glibc: str | None  # "2.36"; None if not glibc

    @property
    def python_tag(self) -> str:
        major, minor = self.python.split(".")[:2]
        return f"cp{major}{minor}"

    @property
    def python_short(self) -> str:
        return ".".join(self.python.split(".")[:2])

    def platform_tags(self) -> list[str]:
        arch = self.machine
        if arch not in ("x86_64", "aarch64", "i686", "ppc64le", "s390x", "armv7l"):
            raise BundleError(f"no wheels for the target's architecture {arch!r}")
        if self.glibc is None:
            raise BundleError("the target does not use glibc; no wheelhouse can be built")
        try:
            gmajor, gminor = (int(x) for x in self.glibc.split(".")[:2])
        except ValueError:
            raise BundleError(f"cannot read the target's glibc version {self.glibc!r}") from None
        if gmajor != 2 or gminor < 17:
            raise BundleError(f"the target's glibc {self.glibc} is too old (need >= 2.17)")
        tags = [f"manylinux_2_{m}_{arch}" for m in range(gminor, 4, -1)]
        # Legacy aliases that older wheels are tagged with.
        tags += [f"manylinux2014_{arch}"]
        if arch in ("x86_64", "i686"):
            tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        return tags + ["any"]

    def cache_key(self) -> str:
        return f"{self.python_tag}-{self.machine}-glibc{self.glibc}"


class _PipProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.done: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.out += data
        if len(self.out) > 256 * 1024:
            del self.out[: len(self.out) - 128 * 1024]

    def processEnded(self, reason: Failure) -> None:
        code = 0
        if isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode if reason.value.exitCode is not None else -1
        elif not isinstance(reason.value, ProcessDone):
            code = -1
        self.done.callback(code)


# Small local-filesystem steps of a download, kept out of the coroutines: each is
# a few syscalls on the cache dir.
def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".complete"))


def _start_download_dir(cache_dir: str, path: str, requirements: bytes) -> tuple[str, str]:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(3).hex()}"
    os.makedirs(tmp)
    req_file = os.path.join(tmp, ".requirements.txt")
    with open(req_file, "wb") as f:
        f.write(requirements)
    return tmp, req_file


def _finish_download_dir(tmp: str, req_file: str, path: str) -> None:
    os.unlink(req_file)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("\n".join(sorted(os.listdir(tmp))) + "\n")
    try:
        os.rename(tmp, path)
    except OSError:
        # Another process finished the same download first: use theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(path):
            raise


class Wheelhouse:
    """Wheels for a target platform, downloaded once per (platform, requirements)."""

    log = Logger()

    def __init__(self, cache_dir: str, reactor: Any = None, *, python: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _r

            reactor = _r
        self.cache_dir = os.path.abspath(cache_dir)
        self.reactor = reactor
        self.python = python or sys.executable
        self._waiters: dict[str, list[Deferred[str]]] = {}

    def path_for(self, target: TargetPlatform, requirements: bytes) -> str:
        req_hash = hashlib.sha256(requirements).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{target.cache_key()}-{req_hash}")

    async def ensure(self, target: TargetPlatform, requirements: bytes) -> str:
        """Directory holding the wheels; downloads them if not cached."""
        path = self.path_for(target, requirements)
        if _is_complete(path):
            return path
        waiters = self._waiters.get(path)
        mine: Deferred[str] = Deferred()
        if waiters is not None:
            waiters.append(mine)
            return await mine
        self._waiters[path] = [mine]

        def finish(result: str | Failure) -> None:
            # Every caller waiting on this key gets the same outcome.
            for w in self._waiters.pop(path, []):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        Deferred.fromCoroutine(self._download(target, requirements, path)).addBoth(finish)
        return await mine

    async def _download(self, target: TargetPlatform, requirements: bytes, path: str) -> str:
        tags = target.platform_tags()
        tmp, req_file = _start_download_dir(self.cache_dir, path, requirements)
        argv = [
            self.python,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            target.python_short,
            "--implementation",
            "cp",
            "--abi",
            target.python_tag,
            "--abi",
            "abi3",
            "--abi",
            "none",
        ]
        for tag in tags:
            argv += ["--platform", tag]
        argv += ["-r", req_file, "-d", tmp]
        self.log.info(
            "downloading agent wheels for {key} into {path}", key=target.cache_key(), path=path
        )
        proto = _PipProtocol()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.reactor.spawnProcess(proto, self.python, argv, env=env)
        code = await proto.done
        if code != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = proto.out.decode("utf-8", "replace").strip()[-1500:]
            raise BundleError(
                f"pip download for Python {target.python_short} on {target.machine} failed "
                f"(exit {code}): {tail}"
            )
        _finish_download_dir(tmp, req_file, path)
        return path

    @staticmethod
    def wheels(path: str) -> list[str]:
        return sorted(n for n in os.listdir(path) if n.endswith(".whl"))
