"""OutputLog: the combined stream on disk, its index of stream switches, its tails."""

import os
from typing import List, Tuple

from twisted.trial import unittest

from myx_agent.outputlog import STDERR, STDOUT, TAIL_BYTES, OutputLog


class OutputLogTests(unittest.TestCase):
    def test_many_switches_binary_search(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        log = OutputLog(d, writable=True)
        chunks = []
        for i in range(300):
            stream = STDOUT if (i // 3) % 2 == 0 else STDERR
            data = bytes([i % 256]) * (1 + (i * 7) % 13)
            log.append(stream, data)
            chunks.append((stream, data))
        log.close()
        # Expected segments: consecutive same-stream chunks merge.
        expected: List[Tuple[int, bytes]] = []
        for stream, data in chunks:
            if expected and expected[-1][0] == stream:
                expected[-1] = (stream, expected[-1][1] + data)
            else:
                expected.append((stream, data))
        ro = OutputLog(d, writable=False)
        self.addCleanup(ro.close)
        offset = 0
        for stream, data in expected:
            for k in range(len(data)):
                got_stream, got = ro.read(offset + k, 1 << 20)
                self.assertEqual(got_stream, stream)
                self.assertEqual(got, data[k:])
            offset += len(data)
        self.assertEqual(ro.read(offset, 10), (None, b""))

    def test_recover_tails(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        log = OutputLog(d, writable=True)
        log.append(STDOUT, b"a" * (TAIL_BYTES + 10))
        log.append(STDERR, b"e1")
        log.append(STDOUT, b"b" * 5)
        log.append(STDERR, b"e2")
        live = {s: (log.tails[s].value(), log.tails[s].truncated) for s in (STDOUT, STDERR)}
        log.close()
        ro = OutputLog(d, writable=False)
        self.addCleanup(ro.close)
        self.assertEqual(ro.recover_tails(), live)
        self.assertEqual(live[STDERR], (b"e1e2", False))
        self.assertTrue(live[STDOUT][1])
        self.assertEqual(live[STDOUT][0], (b"a" * (TAIL_BYTES + 10) + b"b" * 5)[-TAIL_BYTES:])
