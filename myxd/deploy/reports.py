"""What deployments read from agents' output: the failing task of an ansible log,
and check_service.py's per-service report.

Pure functions over text: no I/O, nothing to block.
"""

# test-case-name: tests.daemon.test_deploy_service,tests.deploy.test_deployments

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_TASK_RE = re.compile(r"^TASK \[(?P<task>.*)\] \**\s*$")
_FATAL_RE = re.compile(r"^(?:fatal|failed): \[[^\]]*\]: (?:FAILED|UNREACHABLE)! => (?P<json>\{.*)$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def failing_task(text: str) -> str | None:
    """``"<task>: <message>"`` of the last failed task in an ansible log, if any."""
    task = None
    found = None
    for line in _ANSI_RE.sub("", text).splitlines():
        m = _TASK_RE.match(line.strip())
        if m:
            task = m.group("task")
            continue
        m = _FATAL_RE.match(line.strip())
        if m:
            msg = m.group("json")
            try:
                data = json.loads(msg)
                msg = str(data.get("msg") or data.get("stderr") or msg)
            except ValueError:
                pass
            msg = " ".join(msg.split())
            if len(msg) > 500:
                msg = msg[:497] + "..."
            found = f"{task or 'a task'}: {msg}"
    return found


def parse_check_service(text: str) -> dict[str, dict[str, Any]]:
    """``check_service.py``'s output (one JSON object per service) by service name."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("service"), str):
            out[obj["service"]] = normalize_service(obj)
    return out


def normalize_service(obj: Mapping[str, Any]) -> dict[str, Any]:
    """check_service.py's object plus the flat fields the store indexes."""
    raw_unit = obj.get("unit")
    unit: dict[str, Any] = raw_unit if isinstance(raw_unit, dict) else {}
    installed = obj.get("installed_versions")
    if isinstance(installed, list):
        installed_text = ",".join(str(v) for v in installed) or None
    else:
        installed_text = None if installed is None else str(installed)
    state = unit.get("active_state")
    sub = unit.get("sub_state")
    return {
        **obj,
        "installed_version": installed_text,
        "active_version": obj.get("active_version"),
        "active": state == "active",
        "unit_state": f"{state}/{sub}" if state else None,
        "config_sha256": obj.get("config_sha256"),
    }
