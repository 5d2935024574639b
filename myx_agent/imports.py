# -*- test-case-name: tests.agent.test_imports -*-
"""What the agent process imports at start, for its memory budget (issue 14 §2).

Called once by ``main.run`` before Twisted is imported (``defer_for_agent``);
never by the daemon, the tests' in-process agents, or anything that shares a
process with other code. Each deferral was kept because the installed agent's
idle RSS fell by it (BENCHMARKS.md, "Agent idle memory").

- The standard library's ``ssl``: Twisted's ``twisted.python.compat`` imports
  ``http.cookiejar``, which imports ``urllib.request`` and ``http.client``, which
  import ``ssl`` optionally (``try: import ssl``). The agent speaks TLS through
  pyOpenSSL only. ``defer_stdlib_ssl`` makes that import fail until
  ``allow_stdlib_ssl`` (an Ansible run, in-process).
- ``_hashlib``, the stdlib's OpenSSL-backed hashes: importing it maps the
  system's libcrypto (3.4 MiB of RSS) next to the OpenSSL that cryptography
  carries. ``hashlib`` and ``hmac`` fall back to their built-in SHA-2/MD5/BLAKE2
  when it is missing, as documented. The agent's own bulk hashing (artifacts,
  the deployment tool's archive) uses ``sha256`` below, through cryptography's
  OpenSSL, which is as fast as ``_hashlib`` (the built-in SHA-256 is about 3x
  slower and holds the GIL).
- Package ``__init__`` modules that import much more than the agent uses
  (``defer_package_init``): werkzeug's imports its development server
  (``http.server``, ``socketserver``) and test client, of which Klein needs
  neither (it imports ``werkzeug.routing`` and ``werkzeug.exceptions``); Klein's
  imports its forms, sessions and plating, of which the agent uses only
  ``Klein``; ``asyncio``'s imports the whole event loop, subprocess, streams and
  ``concurrent.futures``, of which ``twisted.internet.defer`` imports only
  ``AbstractEventLoop``, ``Future`` and ``iscoroutine``. The package module is
  the real one (its spec, ``__path__``, ``__file__``); its ``__init__`` runs,
  in full, the first time anything reads one of the package's own names that
  is not listed as a shortcut. Submodules import as usual.

What it must never do: hide or replace a module that is already imported.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

# Names a deferred package serves from one of its submodules without running
# its __init__: each is the very object the __init__ would re-export.
PACKAGE_SHORTCUTS: Dict[str, Dict[str, str]] = {
    "werkzeug": {},
    "klein": {"Klein": "_app"},
    "asyncio": {
        "AbstractEventLoop": "events",
        "Future": "futures",
        "iscoroutine": "coroutines",
    },
    # Its __init__ imports the OpenSSH key formats (``.ssh``: bcrypt, the cipher
    # modules); Twisted and pyOpenSSL use the encodings and PEM/DER loaders.
    "cryptography.hazmat.primitives.serialization": {
        **{
            n: "._serialization"
            for n in (
                "BestAvailableEncryption",
                "Encoding",
                "KeySerializationEncryption",
                "NoEncryption",
                "ParameterFormat",
                "PrivateFormat",
                "PublicFormat",
            )
        },
        **{
            f"load_{form}_{what}": "base"
            for form in ("der", "pem")
            for what in ("parameters", "private_key", "public_key")
        },
    },
}


def defer_for_agent() -> None:
    """Everything below, for the agent's own process; before Twisted is imported."""
    defer_stdlib_ssl()
    defer_openssl_hashlib()
    for name, shortcuts in PACKAGE_SHORTCUTS.items():
        defer_package_init(name, shortcuts)


def defer_stdlib_ssl() -> bool:
    """Make ``import ssl`` fail (ImportError) until allowed; True if done."""
    if "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]
    return True


def allow_stdlib_ssl() -> None:
    """Let ``import ssl`` work again (modules that already fell back stay so)."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]


def defer_openssl_hashlib() -> bool:
    """Make ``import _hashlib`` fail, so that ``hashlib`` and ``hmac`` use their
    built-in hashes; True if done (False if something already imported it)."""
    if "_hashlib" in sys.modules or "hashlib" in sys.modules:
        return False
    sys.modules["_hashlib"] = None  # type: ignore[assignment]
    return True


class _SHA256:
    """``hashlib.sha256``'s update/hexdigest, computed by cryptography's OpenSSL."""

    __slots__ = ("_hash",)

    def __init__(self, data: bytes = b"") -> None:
        from cryptography.hazmat.primitives import hashes

        self._hash = hashes.Hash(hashes.SHA256())
        if data:
            self._hash.update(data)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        """The digest; the object cannot be updated after this."""
        return self._hash.finalize().hex()


def sha256(data: bytes = b"") -> _SHA256:
    """A SHA-256 for bulk data that is fast whether or not ``_hashlib`` is loaded."""
    return _SHA256(data)


def defer_package_init(name: str, shortcuts: Optional[Dict[str, str]] = None) -> bool:
    """Put package ``name`` in ``sys.modules`` without running its ``__init__``.

    The module is made from the package's own spec, so ``import name.sub``
    works as usual. The first read of any other attribute (``name.X``, ``from
    name import X``) runs the package's ``__init__`` in full and answers from
    it; ``shortcuts`` maps names to the submodule that defines them, served
    without the ``__init__``. Returns True if deferred, False if the package is
    already imported or is not a package (then nothing is changed)."""
    if name in sys.modules:
        return False
    import importlib
    import importlib.util
    import threading

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    module = importlib.util.module_from_spec(spec)
    table = dict(shortcuts or {})
    state = {"ran": False}
    lock = threading.RLock()

    def run_init() -> None:
        with lock:
            if state["ran"]:
                return
            state["ran"] = True
            module.__dict__.pop("__getattr__", None)
            assert spec.loader is not None
            spec.loader.exec_module(module)

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            # Probes such as __wrapped__ or __warningregistry__: not the package's API.
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        if not state["ran"]:
            sub = table.get(attr)
            if sub is not None:
                # "x" is a submodule of the package, "._x" a sibling of it
                where = (
                    f"{name.rpartition('.')[0]}{sub}" if sub.startswith(".") else f"{name}.{sub}"
                )
                try:
                    return getattr(importlib.import_module(where), attr)
                except (ImportError, AttributeError):
                    pass  # another version of the package: its __init__ knows
            elif importlib.util.find_spec(f"{name}.{attr}") is not None:
                # ``from name import sub``: the import system asks for the
                # submodule as an attribute first.
                return importlib.import_module(f"{name}.{attr}")
        run_init()
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        # As the import system does for a submodule it loads.
        setattr(sys.modules[parent], child, module)
    return True
