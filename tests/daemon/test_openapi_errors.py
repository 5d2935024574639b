"""The admin API document declares 507 (data dir full) for every write operation.

The daemon answers 507 to any write when its store is full (myxd/api/errormap.py;
tests/reliability/test_disk_full.py fills a real daemon's disk), so the document
must say so for each POST, PUT, PATCH and DELETE, and for no read.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from myxd.api import AdminAPI
from myxd.api.openapi import WRITE_METHODS, build_document


class StoreFullDocumentedTests(TestCase):
    def test_every_write_declares_507_and_no_read_does(self) -> None:
        doc = build_document("test", AdminAPI.operations())
        writes = 0
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if method.upper() in WRITE_METHODS:
                    writes += 1
                    answer = op["responses"].get("507")
                    self.assertIsNotNone(answer, (method, path))
                    self.assertIn("full", answer["description"])
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    self.assertEqual(ref, "#/components/schemas/Error", (method, path))
                else:
                    self.assertNotIn("507", op["responses"], (method, path))
        self.assertGreater(writes, 10)
