# -*- test-case-name: tests.agent.test_sysinfo -*-
"""Facts about the host for ``get_status``: hostname, OS, load, memory, disk.

Everything here is cheap and never blocks the reactor: it reads /proc (served
by the kernel from memory), calls os.uname/os.getloadavg/os.statvfs, and reads
/etc/os-release once, at construction. It never runs a subprocess (so no
``platform.uname().processor``) and never raises for a missing source: an
unknown value is None.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict, List, Optional


def _os_release_name(path: str = "/etc/os-release") -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    return fields.get("PRETTY_NAME") or fields.get("NAME") or None


def read_meminfo(path: str = "/proc/meminfo") -> Dict[str, Optional[int]]:
    """Total and available memory in bytes, from /proc/meminfo (None if unknown)."""
    values: Dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                    values[key] = int(parts[0]) * scale
    except OSError:
        return {"total": None, "available": None}
    available = values.get("MemAvailable")
    if available is None and "MemFree" in values:
        # Kernels before 3.14 have no MemAvailable; this is the usual estimate.
        available = values["MemFree"] + values.get("Buffers", 0) + values.get("Cached", 0)
    return {"total": values.get("MemTotal"), "available": available}


class SystemInfo:
    """Host facts. Values that cannot change while the agent runs are read once."""

    def __init__(self, disk_path: str = "/") -> None:
        uname = os.uname()
        pretty = _os_release_name()
        base = f"{uname.sysname} {uname.release}"
        self.os_description = f"{base} ({pretty})" if pretty else base
        self.python_version = "{}.{}.{}".format(*sys.version_info[:3])
        self.disk_path = disk_path

    def hostname(self) -> str:
        return socket.gethostname()

    def load_avg(self) -> Optional[List[float]]:
        try:
            return [round(x, 2) for x in os.getloadavg()]
        except OSError:
            return None

    def memory(self) -> Dict[str, Optional[int]]:
        return read_meminfo()

    def disk(self) -> Dict[str, Any]:
        try:
            st = os.statvfs(self.disk_path)
        except OSError:
            return {"path": self.disk_path, "total": None, "free": None}
        return {
            "path": self.disk_path,
            "total": st.f_blocks * st.f_frsize,
            "free": st.f_bavail * st.f_frsize,
        }
