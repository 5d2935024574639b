"""Shared plumbing of the benchmarks: the daemon and simulator processes, and figures.

- ``Daemon`` runs ``twistd -n myxd`` as its own process (so its CPU and RSS are
  read from /proc for that process alone), on a temp data dir, with the admin
  API on a free loopback port (``tcp:0``; the port is read from the log), and
  tails its log to time heartbeat cycles.
- ``Sim`` runs ``bench.fleet_sim`` in one or more shard processes and collects
  their adoption files.
- ``adopt_api`` adopts agents through ``POST /api/agents`` (with concurrency),
  ``adopt_store`` through ``bench.bulk_adopt`` (daemon stopped).
- ``Sampler`` samples a process's CPU seconds and RSS in the background, so
  any time window can be read afterwards.

The daemon runs the way users run it: ``twistd`` of an installed MyX, cwd in
its data dir, no PYTHONPATH, so the figures are those of the installed package.
That install is ``$MYX_BENCH_VENV`` (any venv with MyX installed: a user's
``pip install .`` venv, or a ``MYX_TEST_VENV``), else the wheel of this
checkout built once per benchmark process into a temp venv
(tests/support/installed.py: ``pip wheel --no-deps`` plus a venv that reaches
the dependencies through a view of this interpreter's site-packages; a few
seconds, offline). ``Daemon(env={"PYTHONPATH": ...})`` (B5's
``B5_PYTHONPATH``) still puts another tree first, to compare builds.
The simulator, ``bulk_adopt`` and the agents of B6 and agent_bench run from the
checkout: they are bench tools, or the agent's code is the same module either
way and an installed agent (a venv on a target, made by the installer) is
benchmarked by install_bench on real hosts.

Nothing here listens or connects beyond 127.0.0.1, and every process started is
stopped by the object that started it (use them as context managers).
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PYTHON = sys.executable
VENV_VAR = "MYX_BENCH_VENV"
_venv: Optional[str] = None
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the installed MyX -----------------------------------------------------------


def installed_venv() -> str:
    """The venv the daemon runs from: ``$MYX_BENCH_VENV``, else the wheel, built once."""
    global _venv
    if _venv is None:
        configured = os.environ.get(VENV_VAR)
        if configured:
            if not os.path.isfile(os.path.join(configured, "bin", "twistd")):
                raise RuntimeError(f"{VENV_VAR}={configured}: no bin/twistd in that venv")
            _venv = configured
        else:
            from tests.support import installed

            root = tempfile.mkdtemp(prefix="myx-bench-venv-")
            atexit.register(shutil.rmtree, root, True)
            _venv = installed.build(root)
    return _venv


def twistd() -> str:
    return os.path.join(installed_venv(), "bin", "twistd")


def installed_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This environment without PYTHON*/VIRTUAL_ENV, the venv's bin first; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join([os.path.join(installed_venv(), "bin"), env.get("PATH", "")])
    env.update(extra or {})
    return env


# -- figures -------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100) of a non-empty sequence."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def machine() -> Dict[str, str]:
    import twisted

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def print_header(name: str) -> None:
    m = machine()
    print(f"== {name}")
    print(
        f"machine: nproc={m['nproc']} cpu={m['cpu']!r} python={m['python']} "
        f"twisted={m['twisted']} kernel={m['kernel']}"
    )
    print(f"load average at start: {load()}")
    sys.stdout.flush()


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_with_children(pid: int) -> float:
    """Like cpu_seconds, plus the CPU of its reaped children (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def status_field(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon ...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Samples (time, cpu seconds, rss) of a process every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1, *, children: bool = False) -> None:
        self.pid = pid
        self._cpu = cpu_seconds_with_children if children else cpu_seconds
        self.interval = interval
        self.samples: List[Tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self._cpu(self.pid), rss_bytes(self.pid)))
            except (OSError, ValueError, IndexError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu_at(self, t: float) -> float:
        """CPU seconds at time t, interpolated between samples."""
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0, _), (t1, c1, _) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return s[-1][1]

    def cpu_between(self, t0: float, t1: float) -> float:
        return self.cpu_at(t1) - self.cpu_at(t0)

    def max_rss(self, t0: float = 0.0, t1: float = float("inf")) -> int:
        return max((r for t, _, r in self.samples if t0 <= t <= t1), default=0)


# -- processes -----------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _terminate(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Daemon:
    """``twistd -n myxd`` on a temp data dir; ``api()`` talks to its admin API."""

    def __init__(
        self,
        *,
        data_dir: Optional[str] = None,
        flags: Optional[Dict[str, Any]] = None,
        name: str = "myxd",
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.env = env
        self.owns_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="myx-bench-daemon-")
        self.flags = dict(flags or {})
        self.token = secrets.token_urlsafe(24)
        self.log_path = os.path.join(self.data_dir, "myxd.log")
        self.proc: Optional[subprocess.Popen[Any]] = None
        self.port = 0
        self.name = name
        self.cycles: List[Dict[str, Any]] = []  # heartbeat cycle log lines, timed on arrival
        self._tail_stop = threading.Event()
        self._tail: Optional[threading.Thread] = None
        self._conns = threading.local()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> Daemon:
        args = [
            twistd(),
            "-n",
            "--logfile",
            self.log_path,
            "--pidfile",
            os.path.join(self.data_dir, "twistd.pid"),
            "myxd",
            "--data-dir",
            self.data_dir,
            "--api",
            "tcp:0:interface=127.0.0.1",
            "--admin-token",
            self.token,
        ]
        for key, value in self.flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        open(self.log_path, "a").close()
        # As a user runs it: the installed twistd, cwd outside the checkout.
        env = installed_env(self.env)
        self.proc = subprocess.Popen(
            args,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_raise_nofile,
        )
        self._tail = threading.Thread(target=self._follow, daemon=True)
        self._tail.start()
        deadline = time.time() + timeout
        while time.time() < deadline and not self.port:
            if self.proc.poll() is not None:
                raise RuntimeError(f"myxd exited ({self.proc.returncode}):\n" + self.log_tail())
            time.sleep(0.05)
        if not self.port:
            raise RuntimeError("myxd did not start listening:\n" + self.log_tail())
        while time.time() < deadline:
            try:
                if self.api("GET", "/api/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("myxd API did not answer")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    _listen_re = re.compile(r"admin API listening on [0-9.]+:(\d+)")
    _cycle_re = re.compile(
        r"heartbeat cycle (\d+): (\d+) agents, (\d+) ok, (\d+) failed in ([0-9.]+)s"
    )

    def _follow(self) -> None:
        with open(self.log_path, errors="replace") as f:
            buf = ""
            while not self._tail_stop.is_set():
                chunk = f.read()
                if not chunk:
                    time.sleep(0.02)
                    continue
                now = time.time()
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    m = self._listen_re.search(line)
                    if m and not self.port:
                        self.port = int(m.group(1))
                    m = self._cycle_re.search(line)
                    if m:
                        number, agents, ok, failed, duration = m.groups()
                        self.cycles.append(
                            {
                                "number": int(number),
                                "agents": int(agents),
                                "ok": int(ok),
                                "failed": int(failed),
                                "duration": float(duration),
                                "seen_at": now,
                                "started_at": now - float(duration),
                            }
                        )

    def wait_cycles(self, n: int, timeout: float) -> List[Dict[str, Any]]:
        deadline = time.time() + timeout
        while len(self.cycles) < n:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(self.cycles)} of {n} heartbeat cycles seen")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("myxd exited:\n" + self.log_tail())
            time.sleep(0.02)
        return self.cycles[:n]

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._conns, "c", None)
        if conn is None or getattr(conn, "_myx_port", None) != self.port:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn._myx_port = self.port  # type: ignore[attr-defined]
            self._conns.c = conn
        return conn

    def api(
        self, method: str, path: str, body: Any = None, timeout: float = 120.0
    ) -> Tuple[int, Any]:
        """One admin API call (keep-alive per thread); returns (status, decoded JSON|text)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._conn()
            conn.timeout = timeout
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._conns.c = None
                if attempt == 2:
                    raise
        ctype = resp.getheader("content-type") or ""
        return resp.status, json.loads(raw) if "json" in ctype else raw.decode(errors="replace")

    def metrics(self) -> str:
        status, text = self.api("GET", "/metrics")
        return text if status == 200 else ""

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 60)
        self._tail_stop.set()
        if self._tail is not None:
            self._tail.join(5)

    def cleanup(self) -> None:
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class Sim:
    """``bench.fleet_sim`` in `shards` processes; ``entries`` is the whole fleet."""

    def __init__(
        self,
        count: int,
        *,
        shards: int = 1,
        base_port: int = 0,
        extra: Sequence[str] = (),
        record: bool = False,
    ) -> None:
        self.count = count
        self.shards = shards
        self.base_port = base_port
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="myx-bench-sim-")
        self.procs: List[subprocess.Popen[Any]] = []
        self.files = [os.path.join(self.dir, f"fleet-{i}.jsonl") for i in range(shards)]
        self.records = (
            [os.path.join(self.dir, f"record-{i}.json") for i in range(shards)] if record else []
        )
        self.entries: List[Dict[str, Any]] = []

    def start(self, timeout: float = 600.0) -> Sim:
        for i in range(self.shards):
            args = [
                PYTHON,
                "-m",
                "bench.fleet_sim",
                "--count",
                str(self.count),
                "--shard",
                f"{i}/{self.shards}",
                "--out",
                self.files[i],
                *self.extra,
            ]
            if self.base_port:
                args += ["--base-port", str(self.base_port)]
            if self.records:
                args += ["--record", self.records[i]]
            log = open(os.path.join(self.dir, f"sim-{i}.log"), "w")
            self.procs.append(
                subprocess.Popen(args, cwd=REPO, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )
        deadline = time.time() + timeout
        for i, proc in enumerate(self.procs):
            while not os.path.exists(self.files[i]):
                if proc.poll() is not None:
                    raise RuntimeError(f"fleet_sim shard {i} exited:\n" + self.log(i))
                if time.time() > deadline:
                    raise RuntimeError(f"fleet_sim shard {i} not ready")
                time.sleep(0.1)
        from bench.bulk_adopt import read_fleet

        self.entries = read_fleet(self.files)
        return self

    def log(self, i: int) -> str:
        try:
            with open(os.path.join(self.dir, f"sim-{i}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def recorded(self) -> Dict[int, List[float]]:
        """Heartbeat arrival times per endpoint index (after stop())."""
        out: Dict[int, List[float]] = {}
        for path in self.records:
            with open(path) as f:
                out.update({int(k): v for k, v in json.load(f).items()})
        return out

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# -- adoption ------------------------------------------------------------------


def adopt_api(
    daemon: Daemon, entries: Iterable[Dict[str, Any]], concurrency: int = 16
) -> List[int]:
    """Adopt through POST /api/agents (pinned get_status each); returns agent ids."""
    fields = ("host", "rpc_port", "rpc_path", "token", "cert_fingerprint")

    def one(entry: Dict[str, Any]) -> int:
        status, body = daemon.api("POST", "/api/agents", {k: entry[k] for k in fields})
        if status != 201:
            raise RuntimeError(f"adopt {entry['host']}:{entry['rpc_port']}: {status} {body}")
        return int(body["id"])

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, list(entries)))


def adopt_store(data_dir: str, files: Sequence[str]) -> str:
    """Insert agents straight into the store (the daemon must not be running)."""
    out = subprocess.run(
        [PYTHON, "-m", "bench.bulk_adopt", "--data-dir", data_dir, *files],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line of a Prometheus text page (0 if absent)."""
    needle = name + (labels if labels else "")
    for line in text.splitlines():
        if line.startswith(needle + " "):
            return float(line.split()[-1])
    return 0.0
