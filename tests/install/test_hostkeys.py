"""In-memory tests of the host-key trust rules (myxd.install.hostkeys)."""

from __future__ import annotations

import base64
import hashlib

from twisted.conch.ssh.keys import Key
from twisted.trial import unittest

from myxd.install.hostkeys import (
    ALL_ALGORITHMS,
    HostKeyMismatch,
    HostKeyPolicy,
    InvalidFingerprint,
    InvalidHostKey,
    format_fingerprint,
    parse_fingerprint,
)


def _key(kind: str) -> Key:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if kind == "ed25519":
        return Key(ed25519.Ed25519PrivateKey.generate())
    if kind == "ecdsa":
        return Key(ec.generate_private_key(ec.SECP256R1()))
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))


class FingerprintTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = _key("ed25519").public()
        self.blob = self.key.blob()
        self.digest = hashlib.sha256(self.blob).digest()

    def test_format_matches_ssh_keygen_form(self) -> None:
        fp = format_fingerprint(self.blob)
        self.assertTrue(fp.startswith("SHA256:"))
        self.assertNotIn("=", fp)
        self.assertEqual(base64.b64decode(fp[7:] + "="), self.digest)

    def test_parse_accepts_every_documented_form(self) -> None:
        b64 = base64.b64encode(self.digest).decode()
        hexd = self.digest.hex()
        forms = [
            "SHA256:" + b64.rstrip("="),
            "SHA256:" + b64,
            "sha256:" + b64.rstrip("="),
            hexd,
            hexd.upper(),
            ":".join(hexd[i : i + 2] for i in range(0, 64, 2)),
            "SHA256:" + hexd,
            "  " + hexd + "\n",
        ]
        for form in forms:
            self.assertEqual(parse_fingerprint(form), self.digest, form)

    def test_parse_rejects_garbage_and_md5(self) -> None:
        for bad in ["", "SHA256:", "abc", "SHA256:" + "A" * 40, "g" * 64, "12" * 31]:
            self.assertRaises(InvalidFingerprint, parse_fingerprint, bad)
        e = self.assertRaises(InvalidFingerprint, parse_fingerprint, "MD5:" + "aa:" * 15 + "aa")
        self.assertIn("MD5", str(e))


class PolicyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = _key("ed25519").public()
        self.other = _key("ed25519").public()
        self.line = self.key.toString("openssh").decode()

    def test_first_use_accepts_and_asks_to_store(self) -> None:
        check = HostKeyPolicy().check(self.key.blob())
        self.assertEqual(check.reason, "first-use")
        self.assertTrue(check.store)
        self.assertEqual(check.openssh.split()[:2], self.line.split()[:2])

    def test_known_key_must_match_exactly(self) -> None:
        policy = HostKeyPolicy(known_key=self.line)
        check = policy.check(self.key.blob())
        self.assertEqual(check.reason, "known")
        self.assertFalse(check.store)
        e = self.assertRaises(HostKeyMismatch, policy.check, self.other.blob())
        self.assertIn("host key changed", str(e))
        self.assertIn("no credentials were sent", str(e))
        self.assertEqual(e.presented, format_fingerprint(self.other.blob()))
        self.assertEqual(e.expected, format_fingerprint(self.key.blob()))

    def test_pin_wins_and_mismatch_is_refused(self) -> None:
        pin = format_fingerprint(self.key.blob())
        check = HostKeyPolicy(pinned=pin).check(self.key.blob())
        self.assertEqual(check.reason, "pinned")
        self.assertTrue(check.store, "a pinned key not stored yet is stored")
        self.assertFalse(
            HostKeyPolicy(pinned=pin, known_key=self.line).check(self.key.blob()).store
        )
        e = self.assertRaises(HostKeyMismatch, HostKeyPolicy(pinned=pin).check, self.other.blob())
        self.assertIn("does not match the pinned fingerprint", str(e))
        # A hex pin works the same way.
        hex_pin = hashlib.sha256(self.key.blob()).hexdigest()
        self.assertEqual(HostKeyPolicy(pinned=hex_pin).check(self.key.blob()).reason, "pinned")

    def test_bad_inputs_fail_at_construction(self) -> None:
        self.assertRaises(InvalidFingerprint, HostKeyPolicy, pinned="nope")
        self.assertRaises(InvalidHostKey, HostKeyPolicy, known_key="ssh-ed25519 !!!")

    def test_algorithm_groups(self) -> None:
        # Nothing known: one attempt offering every algorithm, never SHA-1 ssh-rsa/DSA.
        self.assertEqual(HostKeyPolicy().algorithm_groups(), [ALL_ALGORITHMS])
        self.assertNotIn(b"ssh-rsa", ALL_ALGORITHMS)
        self.assertNotIn(b"ssh-dss", ALL_ALGORITHMS)
        # A stored key: only its own algorithms, so the server shows that key.
        self.assertEqual(HostKeyPolicy(known_key=self.line).algorithm_groups(), [[b"ssh-ed25519"]])
        ec_line = _key("ecdsa").public().toString("openssh").decode()
        self.assertEqual(
            HostKeyPolicy(known_key=ec_line).algorithm_groups(), [[b"ecdsa-sha2-nistp256"]]
        )
        rsa_line = _key("rsa").public().toString("openssh").decode()
        self.assertEqual(
            HostKeyPolicy(known_key=rsa_line).algorithm_groups(),
            [[b"rsa-sha2-512", b"rsa-sha2-256"]],
        )
        # A pin: each key type in turn.
        groups = HostKeyPolicy(pinned=format_fingerprint(self.key.blob())).algorithm_groups()
        self.assertEqual(len(groups), 3)
        self.assertEqual(groups[0], [b"ssh-ed25519"])
