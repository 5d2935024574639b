# -*- test-case-name: tests.daemon.test_store -*-
"""At-rest encryption of secrets in the store (agent tokens, SSH credentials).

The key is a Fernet key in ``<data_dir>/secret.key``, created once with mode
600 and never rewritten. This module never logs keys or plaintexts, and it
never overwrites an existing key file: losing the key would make every stored
secret unreadable.

The functions here do blocking file I/O; the store calls them from its
database thread, never from the reactor thread.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from myxd.errors import SecretKeyError

KEY_FILE_NAME = "secret.key"


def load_or_create_key(path: str) -> bytes:
    """Return the Fernet key in ``path``, creating it (mode 600) if absent.

    Creation is atomic: the key is written and fsynced to a temporary file in
    the same directory, then hard-linked into place, so a crash never leaves a
    half-written key and two racing starters end up with the same key.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    key = Fernet.generate_key()
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, key + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Someone else won the race; theirs is the key.
            return _read_key(path)
        _fsync_dir(directory)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return key


def _read_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read().strip()
    try:
        Fernet(key)
    except (ValueError, TypeError) as e:
        raise SecretKeyError(f"{path}: not a valid Fernet key") from e
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        # Tighten rather than refuse: the file may come from a restore that
        # lost permissions, and refusing to start helps nobody.
        os.chmod(path, 0o600)
    return key


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SecretBox:
    """Encrypts strings and JSON values with one Fernet key.

    Decryptions are cached (bounded) by ciphertext: the heartbeat lists every
    agent each cycle, and re-decrypting 10,000 tokens every cycle is wasted CPU.
    """

    def __init__(self, key: bytes, *, cache_size: int = 65536) -> None:
        self._fernet = Fernet(key)
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, ciphertext: bytes) -> str:
        ciphertext = bytes(ciphertext)
        with self._lock:
            hit = self._cache.get(ciphertext)
            if hit is not None:
                self._cache.move_to_end(ciphertext)
                return hit
        try:
            plaintext = self._fernet.decrypt(ciphertext).decode("utf-8")
        except InvalidToken as e:
            raise SecretKeyError(
                "a stored secret does not decrypt with the key in the data dir "
                "(was secret.key replaced?)"
            ) from e
        with self._lock:
            self._cache[ciphertext] = plaintext
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return plaintext

    def encrypt_json(self, value: Any) -> bytes:
        return self.encrypt(json.dumps(value, separators=(",", ":"), sort_keys=True))

    def decrypt_json(self, ciphertext: bytes) -> Any:
        return json.loads(self.decrypt(ciphertext))
