#!/usr/bin/env python3
"""Unpack a release zip into a version directory, all or nothing.

Usage: unpack_zip.py ARCHIVE DEST [EXECUTABLE ...]
Extracts into a temporary directory beside DEST, marks the named members
executable (zip files carry no trustworthy modes), then renames it to DEST.
It never writes outside DEST's parent directory (zipfile strips absolute names
and ".."), never replaces an existing DEST, and leaves nothing behind on error.
Used by deploy_xray.yml: hosts need no unzip binary.
"""

import os
import shutil
import sys
import tempfile
import zipfile


def main(argv: list) -> int:
    if len(argv) < 3:
        print("usage: unpack_zip.py ARCHIVE DEST [EXECUTABLE ...]", file=sys.stderr)
        return 2
    archive, dest, executables = argv[1], argv[2].rstrip("/"), argv[3:]
    if os.path.exists(dest):
        print(f"unpack_zip: {dest} exists; not replaced", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.dirname(dest))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        for name in executables:
            path = os.path.join(tmp, name)
            if not os.path.isfile(path):
                raise ValueError(f"{archive} has no {name}")
            os.chmod(path, 0o755)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"unpack_zip: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
