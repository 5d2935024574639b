"""Tests of myx_agent.sysinfo: host facts for get_status, from /proc and system calls."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from myx_agent.sysinfo import SystemInfo, _os_release_name, read_meminfo


class SysInfoTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_meminfo(self) -> None:
        path = self.write("MemTotal:       16000 kB\nMemFree: 1000 kB\nMemAvailable:    8000 kB\n")
        self.assertEqual(read_meminfo(path), {"total": 16000 * 1024, "available": 8000 * 1024})

    def test_meminfo_without_memavailable(self) -> None:
        path = self.write("MemTotal: 100 kB\nMemFree: 10 kB\nBuffers: 5 kB\nCached: 20 kB\n")
        self.assertEqual(read_meminfo(path), {"total": 102400, "available": 35 * 1024})

    def test_meminfo_missing(self) -> None:
        self.assertEqual(read_meminfo(self.mktemp()), {"total": None, "available": None})

    def test_os_release(self) -> None:
        path = self.write('NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
        self.assertEqual(_os_release_name(path), "Debian GNU/Linux 12 (bookworm)")
        self.assertEqual(_os_release_name(self.write("NAME=Alpine\n")), "Alpine")
        self.assertIsNone(_os_release_name(self.mktemp()))

    def test_live_values(self) -> None:
        info = SystemInfo()
        self.assertTrue(info.os_description.startswith(os.uname().sysname))
        load = info.load_avg()
        assert load is not None
        self.assertEqual(len(load), 3)
        memory = info.memory()
        self.assertGreater(memory["total"] or 0, 0)
        disk = info.disk()
        self.assertEqual(disk["path"], "/")
        self.assertGreater(disk["total"], 0)
        missing = SystemInfo(disk_path=os.path.join(self.mktemp(), "none")).disk()
        self.assertIsNone(missing["total"])
