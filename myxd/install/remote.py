# -*- test-case-name: tests.install.test_remote,tests.install.test_steps -*-
"""What an install does ON the target: its file layout, the systemd unit, the shell scripts.

Every script here is plain POSIX sh, run through the SSH login shell (``check``)
or as root (``sh -c`` directly, or via sudo). Values are interpolated only with
``shlex.quote``; no secret is ever put into a script or a command line: the
agent's config travels by SFTP (mode 600) and sudo passwords on stdin.

Nothing here performs I/O; the installer runs these strings over SSH.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

AGENT_DIR = "/opt/myx-agent"
VENV_DIR = f"{AGENT_DIR}/venv"
CONFIG_DIR = "/etc/myx-agent"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
CERT_PATH = f"{CONFIG_DIR}/ssl/agent.crt"
STATE_DIR = "/var/lib/myx-agent"
TOOL_DIR = "/opt/myx-deployment-tool"
UNIT_NAME = "myx-agent.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
REQUIREMENTS_STAMP = f"{VENV_DIR}/.myx-requirements"
MIN_PYTHON = (3, 9)

q = shlex.quote


def unit_file() -> str:
    """The agent's systemd unit.

    Hardening is limited to what cannot break the commands the agent runs for
    an administrator (package installs, service management, docker, sudo):
    no NoNewPrivileges, ProtectSystem, PrivateTmp or namespace restrictions.
    """
    return f"""# Managed by MyX (myxd); rewritten on every (re)install.
[Unit]
Description=MyX agent (JSON-RPC 2.0 over HTTPS)
Documentation=https://github.com/myx/myx/blob/main/docs/protocol.md
After=network-online.target
Wants=network-online.target
# Never give up restarting: the daemon can only reach a running agent.
StartLimitIntervalSec=0

[Service]
Type=simple
WorkingDirectory={AGENT_DIR}
Environment=PYTHONPATH={AGENT_DIR}
Environment=PYTHONUNBUFFERED=1
Environment=PYTHONDONTWRITEBYTECODE=1
Environment=MALLOC_ARENA_MAX=2
# A fixed mmap threshold: buffers over 128 KiB (1 MiB log reads, artifact
# chunks) are returned to the system when freed instead of growing the heap
# (glibc otherwise raises the threshold after the first free); BENCHMARKS.md.
Environment=MALLOC_MMAP_THRESHOLD_=131072
ExecStart={VENV_DIR}/bin/python -m myx_agent --config {CONFIG_PATH}
Restart=always
RestartSec=2
StateDirectory=myx-agent
StateDirectoryMode=0700
# Hardening that leaves administrative commands working.
UMask=0022
LimitNOFILE=65536
LimitCORE=0
KeyringMode=private
LockPersonality=yes
RestrictRealtime=yes
OOMScoreAdjust=-500
TimeoutStopSec=30
KillMode=control-group

[Install]
WantedBy=multi-user.target
"""


def agent_config(
    *,
    token: str,
    secret_key: str,
    rpc_port: int,
    rpc_path: str,
    bind: str | None = None,
) -> bytes:
    """/etc/myx-agent/config.json (secrets: upload with mode 600, never log)."""
    cfg: dict[str, Any] = {
        "agent_token": token,
        "secret_key": secret_key,
        "rpc_port": int(rpc_port),
        "rpc_path": rpc_path,
        "state_dir": STATE_DIR,
        "deployment_tool_dir": TOOL_DIR,
    }
    if bind:
        cfg["bind"] = bind
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_script(port: int) -> str:
    """Facts about the target as ``key=value`` lines; runs as the SSH user."""
    return f"""set -u
PORT={int(port)}
if [ -r /etc/os-release ]; then . /etc/os-release; fi
echo "os=${{PRETTY_NAME:-unknown}}"
echo "os_id=${{ID:-unknown}}"
echo "kernel=$(uname -sr)"
echo "machine=$(uname -m)"
if command -v python3 >/dev/null 2>&1; then
  echo "python=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
  if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then echo venv=yes; else echo venv=no; fi
else
  echo "python="
fi
echo "glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p')"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  echo systemd=yes
else
  echo systemd=no
fi
if command -v ss >/dev/null 2>&1; then
  if [ -n "$(ss -Hltn "sport = :$PORT" 2>/dev/null)" ]; then echo port=busy; else echo port=free; fi
else
  echo port=unknown
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet {UNIT_NAME} 2>/dev/null; then
  echo agent=active
else
  echo agent=inactive
fi
"""


def parse_facts(text: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            facts[k.strip()] = v.strip()
    return facts


@dataclass(frozen=True)
class Staging:
    """The SSH user's private temp dir for one install (mode 700, removed at the end)."""

    path: str

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or "'" in self.path or "\n" in self.path:
            raise ValueError(f"unexpected staging path {self.path!r}")

    @property
    def agent(self) -> str:
        return f"{self.path}/agent"

    @property
    def wheels(self) -> str:
        return f"{self.path}/wheels"


MAKE_STAGING = (
    "umask 077 && d=$(mktemp -d /tmp/myx-install.XXXXXXXXXX) && "
    'mkdir -p "$d/agent/myx_agent" "$d/wheels" && echo "$d"'
)


def remove_staging(staging: Staging) -> str:
    return f"rm -rf {q(staging.path)}"


# An install cut short (the daemon killed mid-step) leaves its remote script
# running: a closed SSH channel without a pty does not stop it. The next install
# waits for it on this lock (held by the script and every child that inherits
# fd 9) instead of racing it: an "rm -rf venv" against a pip still writing there
# fails with "Directory not empty".
INSTALL_LOCK = f"""exec 9>{AGENT_DIR}/.install.lock
if command -v flock >/dev/null 2>&1 && ! flock -w 600 9; then
  echo "another install of the agent is still running on this host (waited 10 minutes)" >&2
  exit 1
fi"""


def install_agent_files(staging: Staging) -> str:
    """Swap the uploaded package into /opt/myx-agent/myx_agent (root)."""
    src = q(f"{staging.agent}/myx_agent")
    return f"""set -e
install -d -m 755 -o root -g root {AGENT_DIR}
{INSTALL_LOCK}
rm -rf {AGENT_DIR}/myx_agent.new {AGENT_DIR}/myx_agent.old
cp -R {src} {AGENT_DIR}/myx_agent.new
chown -R root:root {AGENT_DIR}/myx_agent.new
chmod -R u=rwX,go=rX {AGENT_DIR}/myx_agent.new
if [ -e {AGENT_DIR}/myx_agent ]; then mv {AGENT_DIR}/myx_agent {AGENT_DIR}/myx_agent.old; fi
mv {AGENT_DIR}/myx_agent.new {AGENT_DIR}/myx_agent
rm -rf {AGENT_DIR}/myx_agent.old
install -m 644 -o root -g root {q(staging.agent + "/requirements.txt")} {AGENT_DIR}/requirements.txt
"""


def read_requirements_stamp() -> str:
    return (
        f"if [ -x {VENV_DIR}/bin/python ] && {VENV_DIR}/bin/python -c 'import sys' >/dev/null 2>&1;"
        f" then cat {REQUIREMENTS_STAMP} 2>/dev/null; fi; true"
    )


def install_dependencies(stamp: str, wheels_dir: str | None) -> str:
    """Create the venv if needed and pip-install requirements.txt (root).

    ``wheels_dir``: install offline from that wheelhouse; None: from the index.
    The stamp is written last, so an interrupted run is redone next time.
    """
    source = f"--no-index --find-links {q(wheels_dir)}" if wheels_dir is not None else ""
    return f"""set -e
cd {AGENT_DIR}
{INSTALL_LOCK}
PY={VENV_DIR}/bin/python
# A venv cut short (the daemon killed during "python3 -m venv") can have a
# python but no pip: make it again.
if ! {{ [ -x "$PY" ] && "$PY" -c 'import pip' >/dev/null 2>&1; }}; then
  rm -rf {VENV_DIR}
  python3 -m venv {VENV_DIR}
fi
rm -f {REQUIREMENTS_STAMP}
PIP_ROOT_USER_ACTION=ignore {VENV_DIR}/bin/python -m pip install --disable-pip-version-check \\
  --no-input --no-warn-script-location {source} -r {AGENT_DIR}/requirements.txt
{VENV_DIR}/bin/python -c 'import twisted, OpenSSL, klein'
printf '%s\\n' {q(stamp)} > {REQUIREMENTS_STAMP}
"""


def install_config(staging: Staging) -> str:
    """Place config.json atomically: root-owned, mode 600, in a 700 dir (root)."""
    return f"""set -e
install -d -m 700 -o root -g root {CONFIG_DIR}
install -m 600 -o root -g root {q(staging.path + "/config.json")} {CONFIG_DIR}/.config.json.tmp
mv -f {CONFIG_DIR}/.config.json.tmp {CONFIG_PATH}
"""


def install_unit(staging: Staging) -> str:
    """Place the unit atomically, then daemon-reload, enable, restart (root)."""
    # The unit sets PYTHONDONTWRITEBYTECODE (nothing writes under /opt at run
    # time), so compile the agent here: without cached bytecode it starts slower
    # and idles about 8 MB higher.
    return f"""set -e
{VENV_DIR}/bin/python -m compileall -q -x /venv/ {AGENT_DIR} >/dev/null
install -m 644 -o root -g root {q(staging.path + "/" + UNIT_NAME)} {UNIT_PATH}.tmp
mv -f {UNIT_PATH}.tmp {UNIT_PATH}
systemctl daemon-reload
systemctl enable {UNIT_NAME} 2>&1
systemctl restart {UNIT_NAME}
"""


def cert_fingerprint_script() -> str:
    """SHA-256 of the agent certificate's DER bytes, or nothing while it is absent (root)."""
    py = (
        "import hashlib, ssl, sys; "
        "print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[1]).read())).hexdigest())"
    )
    return f"if [ -f {CERT_PATH} ]; then python3 -c {q(py)} {CERT_PATH}; fi"


def unit_state_script() -> str:
    return (
        f"echo active=$(systemctl is-active {UNIT_NAME} 2>/dev/null); "
        f"echo enabled=$(systemctl is-enabled {UNIT_NAME} 2>/dev/null); true"
    )


def restarts_script() -> str:
    """How often systemd restarted the agent since the last (re)start of the unit."""
    return (
        f"echo $(systemctl show -p NRestarts --value {UNIT_NAME} 2>/dev/null) "
        f"$(systemctl is-active {UNIT_NAME} 2>/dev/null); true"
    )


def journal_tail(lines: int = 30) -> str:
    return f"journalctl -u {UNIT_NAME} -n {int(lines)} --no-pager -o cat 2>/dev/null; true"


def disable_unit() -> str:
    """Make a failed install harmless: stop the unit so it does not restart-loop (root)."""
    return (
        f"systemctl disable --now {UNIT_NAME} >/dev/null 2>&1; "
        f"systemctl reset-failed {UNIT_NAME} >/dev/null 2>&1; true"
    )


def uninstall_unit() -> str:
    return f"""systemctl disable --now {UNIT_NAME} >/dev/null 2>&1 || true
rm -f {UNIT_PATH} {UNIT_PATH}.tmp
systemctl daemon-reload
systemctl reset-failed {UNIT_NAME} >/dev/null 2>&1 || true
if systemctl is-active --quiet {UNIT_NAME}; then echo 'myx-agent is still running' >&2; exit 1; fi
true
"""


def uninstall_files() -> str:
    return f"""set -e
rm -rf {AGENT_DIR} {CONFIG_DIR} {STATE_DIR} {TOOL_DIR}
rm -rf /opt/.myx-deployment-tool.new-* /opt/.myx-deployment-tool.old-* \\
  /opt/.myx-deployment-tool.lock
for p in {AGENT_DIR} {CONFIG_DIR} {STATE_DIR} {TOOL_DIR} {UNIT_PATH}; do
  if [ -e "$p" ]; then echo "could not remove $p" >&2; exit 1; fi
done
"""
