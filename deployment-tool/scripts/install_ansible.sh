#!/bin/sh
# Make ansible-core (and ansible-runner) available to the agent, idempotently.
# Usage: install_ansible.sh [VENV_DIR] [VERSION_SPEC]
#   VENV_DIR      the agent's virtualenv, default /opt/myx-agent/venv
#   VERSION_SPEC  default ">=2.15,<2.20" (the range the playbooks are tested with)
# Order: 1. the venv already has an ansible-core inside the range: nothing to do;
#        2. pip install into the venv (offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR);
#        3. if pip cannot, the distribution package (apt-get install ansible-core),
#           which the agent finds on PATH.
# It prints one line saying which path it used, then `ansible-playbook --version`'s first
# line. It only touches VENV_DIR and, in case 3, the system's packages.
set -eu

VENV="${1:-/opt/myx-agent/venv}"
SPEC="${2:->=2.15,<2.20}"

in_range() {
    "$VENV/bin/python" - "$SPEC" <<'PY'
import sys
from importlib import metadata
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
try:
    version = metadata.version("ansible-core")
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if version in SpecifierSet(sys.argv[1]) else 1)
PY
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "install_ansible: no virtualenv at $VENV (is the agent installed?)" >&2
    exit 2
fi

if in_range && [ -x "$VENV/bin/ansible-playbook" ]; then
    echo "install_ansible: already installed in $VENV (ansible-core$SPEC)"
    "$VENV/bin/ansible-playbook" --version | sed -n 1p
    exit 0
fi

if "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
        "ansible-core$SPEC" "ansible-runner>=2.4,<2.5"; then
    echo "install_ansible: installed with pip into $VENV (ansible-core$SPEC)"
    "$VENV/bin/ansible-playbook" --version | sed -n 1p
    exit 0
fi

echo "install_ansible: pip could not install ansible-core$SPEC; trying the distribution package" >&2
if command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q ansible-core >/dev/null
    echo "install_ansible: installed the distribution package ansible-core (apt-get)"
    ansible-playbook --version | sed -n 1p
    exit 0
fi
echo "install_ansible: no pip index and no apt-get; cannot install ansible-core" >&2
exit 1
