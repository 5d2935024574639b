#!/bin/sh
# Install (or upgrade to) ansible-core inside the agent's virtualenv, so that
# execute_ansible finds ansible-playbook next to the agent's Python.
# Usage: install_ansible.sh [VENV_DIR] [VERSION_SPEC]
#   VENV_DIR      default /opt/myx-agent/venv
#   VERSION_SPEC  default ">=2.15,<2.20"
# Offline hosts: set PIP_NO_INDEX=1 and PIP_FIND_LINKS=/path/to/wheelhouse.
# It only touches VENV_DIR; it never installs into the system Python.
set -eu

VENV="${1:-/opt/myx-agent/venv}"
SPEC="${2:->=2.15,<2.20}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "install_ansible: no virtualenv at $VENV (is the agent installed?)" >&2
    exit 2
fi

"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "ansible-core$SPEC"
"$VENV/bin/ansible-playbook" --version | head -n 1
