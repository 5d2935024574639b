"""B7: the same command on 20 and on 100 hosts, Ansible ad hoc vs MyX through agents.

    .venv/bin/python -m bench.b7_peer_ansible [--hosts 20,100] [--runs 3]
        [--ansible default,pipelined]

Ansible: ``ansible all -m command -a hostname -f 50`` (the venv's ansible-core),
over a loopback OpenSSH ``sshd`` on 127.0.0.1 (its own temp dir, host keys and
authorized key; ``MaxStartups`` and ``MaxSessions`` raised so 50 forks are not
throttled), with one inventory name per host. Every name points at 127.0.0.1
and gets its own ``ansible_control_path``, so each "host" has its own SSH
master connection, as separate machines would (sharing one multiplexed
connection would flatter Ansible). Everything else is Ansible's default (no
pipelining, ControlPersist) except: the remote interpreter is set to
/usr/bin/python3 (this host's discovery would pick a broken pyenv shim, and a
fixed interpreter saves Ansible a discovery step), key authentication as root,
and host key checking off for the throwaway loopback keys. Timed: the whole ``ansible``
process, which prints every host's output.

``--ansible`` names the Ansible configurations measured in the same run:
``default`` (as above) and ``pipelined`` (the same plus ``ANSIBLE_PIPELINING=True``,
the strongest setting operators commonly use: the module is fed to the remote
python over the SSH session's stdin, with no temp file, no sftp/scp transfer and
no separate chmod/cleanup round trips).

MyX: a simulator process serves the same number of agents, adopted through the
API; ONE ``POST /api/commands {agents, command: "hostname"}``, then a client
long-polls every command through the API until it has read each output and
exit code. Timed: from the POST to the last output read. For each MyX run the
daemon's CPU and the simulated agents' CPU (their commands included) are
sampled from ``/proc`` and printed per command, as is this client's own CPU (it
shares the machine's cores).

Targets: MyX >= 30x faster than Ansible's defaults on 100 hosts (issue 5) and
>= 100x faster than pipelined Ansible (issue 14).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from bench.fanout import fanout
from bench.harness import BIN, Daemon, Sampler, Sim, adopt_api, load, median, print_header

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackSSHD:
    """A throwaway sshd on 127.0.0.1 that accepts root with one generated key."""

    def __init__(self, base: str) -> None:
        self.dir = os.path.join(base, "sshd")
        os.makedirs(os.path.join(self.dir, "authorized_keys"))
        os.chmod(self.dir, 0o755)  # noqa: S103 - sshd's privsep child reads its config
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.client_key = os.path.join(base, "id_ed25519")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key], check=True
        )
        self.host_key = os.path.join(self.dir, "ssh_host_ed25519_key")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key], check=True
        )
        shutil.copy(self.client_key + ".pub", os.path.join(self.dir, "authorized_keys", "root"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            config = os.path.join(self.dir, "sshd_config")
            with open(config, "w") as f:
                f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys/%u
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxStartups 400:30:800
MaxSessions 400
LogLevel ERROR
Subsystem sftp internal-sftp
""")
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            deadline = time.time() + 20
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_ansible(base: str, sshd: LoopbackSSHD, hosts: int) -> Dict[str, str]:
    cp = os.path.join(base, "cp")
    os.makedirs(cp, exist_ok=True)
    inventory = os.path.join(base, f"inventory-{hosts}.ini")
    with open(inventory, "w") as f:
        f.write("[fleet]\n")
        for i in range(1, hosts + 1):
            f.write(
                f"h{i:03d} ansible_host=127.0.0.1 ansible_port={sshd.port} "
                f"ansible_user=root ansible_ssh_private_key_file={sshd.client_key} "
                f"ansible_control_path={cp}/h{i:03d}\n"
            )
    cfg = os.path.join(base, "ansible.cfg")
    with open(cfg, "w") as f:
        f.write(f"""[defaults]
host_key_checking = False
forks = 50
local_tmp = {base}/ansible-local
remote_tmp = /tmp/.ansible-b7-$USER
interpreter_python = /usr/bin/python3
[ssh_connection]
ssh_args = -C -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null
""")
    return {"inventory": inventory, "config": cfg}


CONFIGS = {"default": {}, "pipelined": {"ANSIBLE_PIPELINING": "True"}}


def run_ansible(files: Dict[str, str], base: str, config: str = "default") -> float:
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=files["config"],
        ANSIBLE_HOME=os.path.join(base, "ansible-home"),
        ANSIBLE_NOCOLOR="1",
    )
    env.pop("ANSIBLE_PIPELINING", None)
    env.update(CONFIGS[config])
    # A fresh control path dir per run: no master connection survives between runs.
    cp = os.path.join(base, "cp")
    shutil.rmtree(cp, ignore_errors=True)
    os.makedirs(cp)
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            os.path.join(BIN, "ansible"),
            "all",
            "-i",
            files["inventory"],
            "-m",
            "command",
            "-a",
            "hostname",
            "-f",
            "50",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - t0
    ok = out.stdout.count("| CHANGED | rc=0")
    hosts = sum(1 for line in open(files["inventory"]) if line.startswith("h"))
    if out.returncode != 0 or ok != hosts:
        raise RuntimeError(
            f"ansible: rc {out.returncode}, {ok}/{hosts} ok\n"
            f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        )
    close_masters(cp)
    return elapsed


def close_masters(cp: str) -> None:
    """Ask each SSH master connection (ControlPersist) this run left to exit."""
    for name in os.listdir(cp):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={os.path.join(cp, name)}", "-O", "exit", "127.0.0.1"],
            check=False,
            capture_output=True,
            timeout=30,
        )


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B7 Ansible vs MyX")
    p.add_argument("--hosts", default="20,100")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--ansible",
        default="default,pipelined",
        help="Ansible configurations to measure, comma-separated: " + ", ".join(CONFIGS),
    )
    args = p.parse_args(argv)
    configs = [c for c in args.ansible.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        p.error(f"--ansible: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    print_header("B7 peer: Ansible ad hoc vs MyX")
    sizes = [int(s) for s in args.hosts.split(",")]
    base = tempfile.mkdtemp(prefix="myx-b7-")
    results: Dict[str, Dict[int, List[float]]] = {c: {} for c in configs}
    results["myx"] = {}
    cost: Dict[int, Dict[str, List[float]]] = {}
    try:
        sshd = LoopbackSSHD(base)
        sshd.start()
        try:
            for n in sizes:
                files = write_ansible(base, sshd, n)
                for run in range(1, args.runs + 1):
                    # Alternate the configurations within each run so load drifts hit both.
                    for config in configs:
                        t = run_ansible(files, base, config)
                        results[config].setdefault(n, []).append(t)
                        print(
                            f"ansible {config:9s} {n:3d} hosts run {run}: {t:.2f}s (load {load()})"
                        )
                        sys.stdout.flush()
        finally:
            sshd.stop()
        with (
            Sim(max(sizes)) as sim,
            Daemon(flags={"heartbeat_min_interval": 600, "heartbeat_max_interval": 600}) as daemon,
        ):
            sim.start()
            daemon.start()
            ids = adopt_api(daemon, sim.entries)
            daemon_s = Sampler(daemon.pid, 0.02)
            sim_s = [Sampler(pid, 0.02, children=True) for pid in sim.pids]
            time.sleep(1.0)
            with ThreadPoolExecutor(max_workers=max(sizes)) as pool:
                for n in sizes:
                    for run in range(1, args.runs + 1):
                        c0 = time.process_time()
                        r = fanout(daemon, ids[:n], "hostname", [], done="api", pool=pool)
                        client = time.process_time() - c0
                        t1 = time.time()
                        t0 = t1 - r["total"]
                        good = sum(
                            1 for x in r["results"] if x["status"] == "success" and x["output"]
                        )
                        if good != n:
                            raise RuntimeError(f"MyX: {good}/{n} commands succeeded")
                        time.sleep(0.1)  # let the samplers pass t1
                        d_ms = daemon_s.cpu_between(t0, t1) * 1000 / n
                        a_ms = sum(s.cpu_between(t0, t1) for s in sim_s) * 1000 / n
                        c_ms = client * 1000 / n
                        results["myx"].setdefault(n, []).append(r["total"])
                        for key, v in (("daemon", d_ms), ("agents", a_ms), ("client", c_ms)):
                            cost.setdefault(n, {}).setdefault(key, []).append(v)
                        print(
                            f"myx               {n:3d} hosts run {run}: {r['total']:.3f}s; "
                            f"CPU per command: daemon {d_ms:.2f} ms, agents {a_ms:.2f} ms "
                            f"(incl. the command), bench client {c_ms:.2f} ms (load {load()})"
                        )
                        sys.stdout.flush()
                        time.sleep(1.0)
            daemon_s.stop()
            for s in sim_s:
                s.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"B7 result (median of {args.runs} runs):")
    print("  hosts | " + " | ".join(f"ansible {c:9s}" for c in configs) + " | MyX     | speed-up")
    for n in sizes:
        m = median(results["myx"][n])
        ans = [median(results[c][n]) for c in configs]
        print(
            f"  {n:5d} | "
            + " | ".join(f"{a:16.2f}s" for a in ans)
            + f" | {m:6.3f}s | "
            + ", ".join(f"{c} {a / m:.1f}x" for c, a in zip(configs, ans))
        )
        k = cost[n]
        print(
            f"        MyX CPU per command (median): daemon {median(k['daemon']):.2f} ms, "
            f"agents {median(k['agents']):.2f} ms incl. the command, "
            f"bench client {median(k['client']):.2f} ms"
        )
    if 100 in sizes:
        m = median(results["myx"][100])
        if "default" in configs:
            ratio = median(results["default"][100]) / m
            print(
                f"  target MyX >= 30x Ansible defaults on 100 hosts: "
                f"{'MET' if ratio >= 30 else 'NOT MET'} ({ratio:.1f}x)"
            )
        if "pipelined" in configs:
            ratio = median(results["pipelined"][100]) / m
            print(
                f"  target MyX >= 100x pipelined Ansible on 100 hosts: "
                f"{'MET' if ratio >= 100 else 'NOT MET'} ({ratio:.1f}x)"
            )
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
