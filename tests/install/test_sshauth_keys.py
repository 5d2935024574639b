"""load_private_key on text that is not a usable key: always KeyLoadError, never a crash.

Found by ``bench/fuzz.py --surface api`` (issue #12 §3): ``POST /api/servers``
with a private key starting with "(" (conch reads it as an LSH s-expression)
answered 500, because conch's parser fails with an AssertionError.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from myxd.install.sshauth import KeyLoadError, load_private_key

NOT_KEYS = [
    "",
    "(",
    "(abc",
    "(3:abc)",
    "(1:a",
    "{x",
    "{",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    "-----BEGIN RSA PRIVATE KEY-----\nnot base64 at all\n-----END RSA PRIVATE KEY-----\n",
    "ssh-ed25519 AAAA",
    "\x00\xff\ud7ff",
    "\ud800",
    "é" * 1000,
]


class NotAKeyTests(TestCase):
    def test_every_bad_key_is_a_key_load_error(self) -> None:
        for text in NOT_KEYS:
            for passphrase in (None, "pw", "\udfff"):
                with self.assertRaises(KeyLoadError, msg=repr(text)) as caught:
                    load_private_key(text, passphrase)
                self.assertNotIn("Traceback", str(caught.exception))
