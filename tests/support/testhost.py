"""Real systemd test hosts: Debian bookworm booted with systemd-nspawn, reached by SSH.

A minbase bookworm root filesystem is built once with debootstrap (from the mirror
apt is configured with) and cached as a tarball OUTSIDE the repo
(``$MYX_TEST_CACHE`` or /var/cache/myx-test/bookworm-rootfs.tar), next to one
extracted copy of it that is never written to. Each TestHost mounts an overlay
whose lower layer is that copy and whose upper layer is in its own temp dir, so
every host starts from the same pristine tree and all it changes stays in its
temp dir; it gets fresh SSH host keys, an sshd on 127.0.0.1:<free port> only, a
root key and password, and boots it with::

    systemd-nspawn --boot --register=no --keep-unit \
        --system-call-filter='add_key keyctl request_key' -D DIR

sharing the host's network namespace (no --private-network): the host's sshd
and agents are reached on 127.0.0.1. Because there is no systemd on the host,
nspawn is started from a cgroup of its own (a child of every mounted cgroup
hierarchy root, created here and removed afterwards), inside a private mount
namespace with a tmpfs on /run/systemd/nspawn (nspawn refuses to clean its
propagation dir when /run is not a tmpfs, which breaks container reboots).
A container reboot makes nspawn exit with status 133; the supervisor shell
loop starts it again, as systemd-nspawn@.service would.

Timings measured on the 2-core dev machine: debootstrap ~47 s plus ~5 s to
extract the shared copy (once per cache), mounting a host's overlay a few ms
(extracting 260 MB per host took 3-11 s), boot to sshd answering ~0.6 s.

Never touches anything outside its temp dir, the cache dir and its own cgroups
and mounts; stops containers by their PID and unmounts their overlays.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
from typing import Any, Awaitable, Callable

from twisted.internet import protocol, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from myxd.install.hostkeys import HostKeyPolicy
from myxd.install.ssh import Credentials, SSHClient, connect
from tests.support.sshd import free_port, keygen

CACHE_DIR = os.environ.get("MYX_TEST_CACHE", "/var/cache/myx-test")
ROOTFS_TAR = os.path.join(CACHE_DIR, "bookworm-rootfs.tar")
# The extracted copy: the read-only lower layer of every host's overlay.
ROOTFS_TREE_PREFIX = os.path.join(CACHE_DIR, "bookworm-rootfs-tree-")
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,iproute2,sudo"
ROOT_PASSWORD = "myx-root-Password-1"
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
REBOOT_EXIT = 133


def apt_mirror(sources_dir: str = "/etc/apt") -> str:
    """The Debian mirror URI that apt on this machine uses for the bookworm suite."""
    candidates: list[tuple[str, list[str]]] = []
    legacy = [os.path.join(sources_dir, "sources.list")] + sorted(
        glob.glob(os.path.join(sources_dir, "sources.list.d", "*.list"))
    )
    for path in legacy:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) >= 3 and parts[0] == "deb":
                        rest = [p for p in parts[1:] if not p.startswith("[")]
                        if len(rest) >= 2:
                            candidates.append((rest[0], [rest[1]]))
        except OSError:
            continue
    for path in sorted(glob.glob(os.path.join(sources_dir, "sources.list.d", "*.sources"))):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                candidates.append((uri, fields.get("suites", "").split()))
    for uri, suites in candidates:
        if SUITE in suites:
            return uri
    return "http://deb.debian.org/debian"


class _Run(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.done: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.out += data
        if len(self.out) > 1_000_000:
            del self.out[:-500_000]

    def processEnded(self, reason: Failure) -> None:
        code = 0
        if isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode if reason.value.exitCode is not None else -1
        self.done.callback(code)


async def run(reactor: Any, argv: list[str], *, check: bool = True, path: str | None = None) -> str:
    """Run a local command without blocking the reactor; return its output."""
    proto = _Run()
    reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ), path=path)
    code = await proto.done
    out = proto.out.decode("utf-8", "replace")
    if check and code != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... exited {code}: {out[-3000:]}")
    return out


async def ensure_rootfs(reactor: Any) -> str:
    """Return the cached rootfs tarball, building it with debootstrap if missing.

    A lock file serialises concurrent test runs; the tarball appears atomically.
    """
    if _exists(ROOTFS_TAR):
        return ROOTFS_TAR
    os.makedirs(CACHE_DIR, exist_ok=True)
    lock_fd = os.open(os.path.join(CACHE_DIR, ".build.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await threads.deferToThread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        if _exists(ROOTFS_TAR):
            return ROOTFS_TAR
        build = os.path.join(CACHE_DIR, f"build-{os.getpid()}")
        if _exists(build):
            await run(reactor, ["/bin/rm", "-rf", build])
        await run(
            reactor,
            [
                shutil.which("debootstrap") or "/usr/sbin/debootstrap",
                "--variant=minbase",
                f"--include={PACKAGES}",
                SUITE,
                build,
                apt_mirror(),
            ],
        )
        # Host keys are made per test host; downloaded .debs only waste space.
        for p in glob.glob(os.path.join(build, "etc/ssh/ssh_host_*")):
            os.unlink(p)
        for p in glob.glob(os.path.join(build, "var/cache/apt/archives/*.deb")):
            os.unlink(p)
        tmp = ROOTFS_TAR + f".tmp-{os.getpid()}"
        await run(reactor, ["/bin/tar", "-C", build, "-cf", tmp, "."])
        os.replace(tmp, ROOTFS_TAR)
        await run(reactor, ["/bin/rm", "-rf", build])
        return ROOTFS_TAR
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)


async def ensure_rootfs_tree(reactor: Any) -> str:
    """Return the cached extracted rootfs (the hosts' shared lower layer).

    Named after the tarball's size and mtime, so a rebuilt tarball gets a new
    tree and a tree that a running host still uses is never changed. It appears
    atomically (extracted beside it, then renamed), under the build lock.
    """
    tar = await ensure_rootfs(reactor)
    st = os.stat(tar)
    tree = f"{ROOTFS_TREE_PREFIX}{st.st_size}-{st.st_mtime_ns}"
    if _exists(tree):
        return tree
    lock_fd = os.open(os.path.join(CACHE_DIR, ".build.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await threads.deferToThread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        if _exists(tree):
            return tree
        tmp = f"{tree}.tmp-{os.getpid()}"
        if _exists(tmp):
            await run(reactor, ["/bin/rm", "-rf", "--one-file-system", tmp])
        os.makedirs(tmp)
        await run(reactor, ["/bin/tar", "-C", tmp, "-xf", tar])
        os.rename(tmp, tree)
        return tree
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)


class TestHost:
    """One booted test host. ``await start()``; ``await stop()`` in cleanup."""

    def __init__(
        self,
        base_dir: str,
        reactor: Any = None,
        *,
        name: str | None = None,
        with_python: bool = True,
        prepare_hook: Callable[[TestHost], Awaitable[None]] | None = None,
        capabilities: tuple[str, ...] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _r

            reactor = _r
        self.reactor = reactor
        self.dir = os.path.abspath(base_dir)
        self.root = os.path.join(self.dir, "root")
        # The overlay's writable layer and its scratch dir (same file system).
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.lower: str | None = None
        self.name = name or f"myxth{os.urandom(3).hex()}"
        self.with_python = with_python
        # Runs once after the root filesystem is ready, before the first boot.
        self.prepare_hook = prepare_hook
        # Capabilities beyond nspawn's default set (e.g. CAP_NET_ADMIN, which
        # docker needs): the host shares this machine's network namespace, so
        # only a test that needs one asks for it, on a host of its own.
        self.capabilities = capabilities
        self.port = 0
        self.key_path = os.path.join(self.dir, "root_id_ed25519")
        self.cgroups: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.host_key_line = ""

    # -- preparation ---------------------------------------------------------
    @property
    def private_key(self) -> str:
        with open(self.key_path) as f:
            return f.read()

    def root_credentials(self, *, password: bool = False) -> Credentials:
        if password:
            return Credentials("root", password=ROOT_PASSWORD)
        return Credentials("root", private_key=self.private_key)

    async def prepare(self) -> None:
        self.lower = await ensure_rootfs_tree(self.reactor)
        for path in (self.root, self.upper, self.work):
            os.makedirs(path, exist_ok=True)
        await self._mount()
        self._configure_root()
        await self.chroot(["chpasswd"], stdin=f"root:{ROOT_PASSWORD}\n")
        self.port = free_port()
        self._write_sshd_config()
        if not self.with_python:
            for p in glob.glob(os.path.join(self.root, "usr/bin/python3*")):
                os.unlink(p)

    def _read_host_key(self) -> str:
        with open(os.path.join(self.root, "etc/ssh/ssh_host_ed25519_key.pub")) as f:
            return " ".join(f.read().split()[:2])

    def _configure_root(self) -> None:
        etc = os.path.join(self.root, "etc")
        with open(os.path.join(etc, "hostname"), "w") as f:
            f.write(self.name + "\n")
        # debootstrap leaves no /etc/hosts; every real server has one, and
        # programs that resolve "localhost" (Caddy's admin endpoint) need it.
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write(
                f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n"
                "::1\tlocalhost ip6-localhost ip6-loopback\n"
            )
        for kind in ("ed25519", "ecdsa"):
            keygen(os.path.join(etc, "ssh", f"ssh_host_{kind}_key"), kind)
        self.host_key_line = self._read_host_key()
        pub = keygen(self.key_path, "ed25519")
        ssh_dir = os.path.join(self.root, "root", ".ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(ssh_dir, "authorized_keys"), "w") as f:
            f.write(pub + "\n")
        os.chmod(os.path.join(ssh_dir, "authorized_keys"), 0o600)

    def _write_sshd_config(self) -> None:
        with open(os.path.join(self.root, "etc/ssh/sshd_config.d/myx-test.conf"), "w") as f:
            f.write(
                f"Port {self.port}\nListenAddress 127.0.0.1\nPermitRootLogin yes\n"
                "PasswordAuthentication yes\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
                "HostKey /etc/ssh/ssh_host_ecdsa_key\nMaxStartups 100\nUseDNS no\n"
            )

    async def chroot(self, argv: list[str], *, stdin: str | None = None) -> str:
        """Run a command inside the (not yet booted) root filesystem."""

        def go() -> str:
            res = subprocess.run(
                ["chroot", self.root, *argv],
                input=stdin.encode() if stdin is not None else None,
                capture_output=True,
                check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"chroot {argv}: {res.stderr.decode(errors='replace')}")
            return res.stdout.decode(errors="replace")

        return await threads.deferToThread(go)

    async def add_user(self, user: str, password: str, *, sudo: str | None) -> None:
        """Before boot: a login user; ``sudo`` is None, 'nopasswd' or 'password'."""
        await self.chroot(["useradd", "--create-home", "--shell", "/bin/bash", user])
        await self.chroot(["chpasswd"], stdin=f"{user}:{password}\n")
        if sudo is not None:
            rule = "NOPASSWD: ALL" if sudo == "nopasswd" else "ALL"
            path = os.path.join(self.root, "etc/sudoers.d", f"myx-{user}")
            with open(path, "w") as f:  # noqa: ASYNC230 - a few bytes, before boot
                f.write(f"{user} ALL=(ALL:ALL) {rule}\n")
            os.chmod(path, 0o440)

    @property
    def mounted(self) -> bool:
        return _ismount(self.root)

    async def _mount(self) -> None:
        assert self.lower is not None
        await run(
            self.reactor,
            [
                "/bin/mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}",
                self.root,
            ],
        )
        _LIVE.add(self)  # unmounted at exit if no cleanup ran

    async def _unmount(self) -> None:
        if self.mounted:
            await run(self.reactor, ["/bin/umount", self.root], check=False)
        if self.mounted:
            # Still busy: detach it now; the kernel frees it once unused.
            await run(self.reactor, ["/bin/umount", "--lazy", self.root])

    # -- lifecycle -----------------------------------------------------------
    def _make_cgroups(self) -> list[str]:
        made = []
        for root in CGROUP_ROOTS:
            if not os.path.exists(os.path.join(root, "cgroup.procs")):
                continue
            if root == "/sys/fs/cgroup" and os.path.isdir("/sys/fs/cgroup/unified"):
                continue  # hybrid layout: /sys/fs/cgroup is a tmpfs of hierarchies
            path = os.path.join(root, f"myx-test-{self.name}")
            os.makedirs(path, exist_ok=True)
            made.append(path)
        return made

    def _spawn(self) -> None:
        """Start the supervisor shell: nspawn in a loop that restarts on reboot (133).

        Deliberately not reactor.spawnProcess: a host may be shared by several
        tests, and Trial rejects a reactor with process pipes left between tests.
        The shell writes nspawn's PID (for stop) and a line per boot (for reboot).
        """
        moves = " && ".join(f"echo $$ > {cg}/cgroup.procs" for cg in self.cgroups) or "true"
        # The keyring calls are allowed so that runc can start containers in a host
        # (it makes a session keyring per container; nspawn's filter refuses it).
        caps = "".join(f"--capability={c} " for c in self.capabilities)
        nspawn = (
            f"systemd-nspawn --boot --register=no --keep-unit --console=passive "
            f"--system-call-filter='add_key keyctl request_key' {caps}"
            f"-M {self.name} -D {self.root}"
        )
        script = (
            "mkdir -p /run/systemd/nspawn && "
            "mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn && "
            f"{moves} && while :; do "
            f"echo boot >> {self.dir}/boots; "
            f"{nspawn} < /dev/null & echo $! > {self.dir}/nspawn.pid; "
            "wait $!; rc=$?; "
            f"echo $rc >> {self.dir}/exits; "
            f"[ $rc -eq {REBOOT_EXIT} ] || exit $rc; "
            "done"
        )
        argv = ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]
        for name in ("boots", "exits", "nspawn.pid"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                os.unlink(path)
        self._log = open(os.path.join(self.dir, "nspawn.log"), "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        _LIVE.add(self)

    @property
    def boots(self) -> int:
        try:
            with open(os.path.join(self.dir, "boots")) as f:
                return len(f.read().split())
        except OSError:
            return 0

    def _nspawn_pid(self) -> int | None:
        try:
            with open(os.path.join(self.dir, "nspawn.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.dir, "nspawn.log"), "rb") as f:
                return f.read()[-5000:].decode(errors="replace")
        except OSError:
            return ""

    async def start(self, *, timeout: float = 120) -> None:
        if self.lower is not None and not self.mounted:
            await self._mount()  # started again after a stop(remove=False)
        if not _exists(os.path.join(self.root, "etc")):
            await self.prepare()
            if self.prepare_hook is not None:
                await self.prepare_hook(self)
        self.cgroups = self._make_cgroups()
        self._spawn()
        await self.wait_for_ssh(timeout=timeout)

    async def wait_for_ssh(self, *, timeout: float = 120) -> None:
        """Poll until sshd on the host's port sends its banner."""
        deadline = self.reactor.seconds() + timeout
        while True:
            if not self.running:
                raise RuntimeError(
                    f"test host {self.name} exited while booting:\n{self.log_text()}"
                )
            ok = await threads.deferToThread(_banner, self.port)
            if ok:
                return
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"test host {self.name}: sshd not up after {timeout} s")
            await deferLater(self.reactor, 0.2, lambda: None)

    async def ssh(self) -> SSHClient:
        """A root SSH connection (key auth, host key pinned to the generated one)."""
        return await connect(
            "127.0.0.1",
            self.port,
            self.root_credentials(),
            HostKeyPolicy(known_key=self.host_key_line or None),
            reactor=self.reactor,
            timeout=60,
        )

    async def sh(self, script: str, *, timeout: float = 120) -> str:
        """Run a shell script as root on the host; raise on failure."""
        client = await self.ssh()
        try:
            res = await client.run(script, timeout=timeout)
        finally:
            await client.close()
        if res.exit_code != 0:
            raise RuntimeError(
                f"{script!r} exited {res.exit_code}: {res.stderr_text()} {res.stdout_text()}"
            )
        return res.stdout_text()

    async def regenerate_host_keys(self) -> None:
        """New SSH host keys, sshd restarted: the server now looks like another machine."""
        await self.sh(
            "rm -f /etc/ssh/ssh_host_* && ssh-keygen -q -A && "
            "(sleep 0.5; systemctl restart ssh) >/dev/null 2>&1 &"
        )
        self.host_key_line = self._read_host_key()
        await self.wait_for_host_key(self.host_key_line)

    async def wait_for_host_key(self, key_line: str, *, timeout: float = 60) -> None:
        """Poll until sshd on the host's port serves ``key_line`` (after a restart)."""
        blob = key_line.split()[1]
        deadline = self.reactor.seconds() + timeout
        while True:
            scan = ["/usr/bin/ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(self.port)]
            out = await run(self.reactor, [*scan, "127.0.0.1"], check=False)
            if blob in out.split():
                return
            if self.reactor.seconds() > deadline:
                raise RuntimeError(
                    f"test host {self.name}: sshd does not serve its new host key after "
                    f"{timeout} s (ssh-keyscan: {out.strip()[-200:]!r})"
                )
            await deferLater(self.reactor, 0.2, lambda: None)

    async def reboot(self, *, timeout: float = 120) -> None:
        boots = self.boots
        client = await self.ssh()
        try:
            await client.run("(sleep 0.3; systemctl reboot) >/dev/null 2>&1 &", timeout=30)
        finally:
            await client.close()
        deadline = self.reactor.seconds() + timeout
        while self.boots == boots:
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"test host {self.name} did not reboot")
            await deferLater(self.reactor, 0.2, lambda: None)
        await self.wait_for_ssh(timeout=timeout)

    async def stop(self, *, remove: bool = True) -> None:
        """Stop the container by its PID (SIGTERM: orderly shutdown; SIGKILL after 60 s)."""
        if self.process is not None:
            deadline = self.reactor.seconds() + 60
            sent_term = False
            while self.process.poll() is None:
                pid = self._nspawn_pid()
                if not sent_term and pid:
                    _signal(pid, signal.SIGTERM)
                    sent_term = True
                if self.reactor.seconds() > deadline:
                    if pid:
                        _signal(pid, signal.SIGKILL)
                    _signal(self.process.pid, signal.SIGKILL)
                await deferLater(self.reactor, 0.1, lambda: None)
        self._finish(remove_root=False)
        await self._unmount()
        if remove:
            paths = [p for p in (self.root, self.upper, self.work) if _exists(p)]
            if paths:
                await run(
                    self.reactor, ["/bin/rm", "-rf", "--one-file-system", *paths], check=False
                )

    def stop_sync(self) -> None:
        """Blocking stop, for atexit (hosts shared across tests)."""
        if self.process is not None and self.process.poll() is None:
            pid = self._nspawn_pid()
            if pid:
                _signal(pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                if pid:
                    _signal(pid, signal.SIGKILL)
                _signal(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._finish(remove_root=True)

    def _finish(self, *, remove_root: bool) -> None:
        for cg in reversed(self.cgroups):
            _remove_cgroup(cg)
        self.cgroups = []
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)
        if remove_root:
            if self.mounted:
                subprocess.run(["umount", self.root], check=False)
            if self.mounted:
                subprocess.run(["umount", "--lazy", self.root], check=False)
            paths = [p for p in (self.root, self.upper, self.work) if os.path.isdir(p)]
            if paths and not self.mounted:
                subprocess.run(["rm", "-rf", "--one-file-system", *paths], check=False)


_LIVE: set[TestHost] = set()


@atexit.register
def _stop_all() -> None:
    for host in list(_LIVE):
        try:
            host.stop_sync()
        except Exception:  # noqa: S110 - best effort at interpreter exit
            pass


_SHARED: dict[str, TestHost] = {}


async def shared_host(key: str, reactor: Any = None, **kwargs: Any) -> TestHost:
    """A booted host shared by the tests of one run (stopped at exit).

    Use only where tests leave the host as they found it, or reinstall over it.
    """
    host = _SHARED.get(key)
    if host is not None and host.running:
        return host
    base = _abspath(os.path.join("shared-test-hosts", key))
    if _exists(base):
        root = os.path.join(base, "root")
        if _ismount(root):  # left mounted by a run that was killed
            await run(reactor or _reactor(), ["/bin/umount", root])
        await run(reactor or _reactor(), ["/bin/rm", "-rf", "--one-file-system", base])
    os.makedirs(base)
    host = TestHost(base, reactor, **kwargs)
    _SHARED[key] = host
    await host.start()
    return host


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _ismount(path: str) -> bool:
    return os.path.ismount(path)


def _abspath(path: str) -> str:
    return os.path.abspath(path)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _remove_cgroup(path: str) -> None:
    # Children first; a cgroup can only be removed once empty of processes.
    for dirpath, dirnames, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        del dirnames
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False
