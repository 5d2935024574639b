"""Bulk adoption for benchmarks: write simulated agents straight into a myxd store.

    .venv/bin/python -m bench.bulk_adopt --data-dir DIR FLEET.jsonl [FLEET2.jsonl ...]

Adopting through ``POST /api/agents`` does one pinned ``get_status`` and four
store transactions per agent, which is the right path for an operator but
makes a 10,000-agent benchmark spend minutes before it starts (the harness
still uses the API for fleets of up to a few hundred, see
``bench.harness.adopt_api``). This tool opens the daemon's own ``Store``
(``myxd.store.StoreService``: same schema, same encryption of the token) on
the data dir **while myxd is not running**, and inserts every agent of the
simulator's adoption files in ONE transaction, status ``online``, with no
heartbeat yet: the daemon's first heartbeat cycle is then the first contact,
exactly as after a restart.

It never talks to an agent, and refuses to run when the data dir's twistd
pid file shows a live daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Any, Dict, List


def read_fleet(paths: List[str]) -> List[Dict[str, Any]]:
    entries: List[Dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    entries.append(json.loads(line))
    return entries


async def _adopt(reactor: Any, data_dir: str, entries: List[Dict[str, Any]]) -> int:
    from myxd.rpc.tls import normalize_fingerprint
    from myxd.store import StoreService
    from myxd.tap import DB_FILE_NAME, prepare_data_dir

    data_dir = prepare_data_dir(data_dir)
    service = StoreService(os.path.join(data_dir, DB_FILE_NAME), reactor)
    service.startService()
    try:
        await service.when_ready()
        box = service.db.box()
        now = time.time()
        rows = [
            (
                e["host"],
                int(e["rpc_port"]),
                e["rpc_path"],
                box.encrypt(e["token"]),
                box.encrypt(secrets.token_urlsafe(32)),
                normalize_fingerprint(e["cert_fingerprint"]),
                now,
                now,
            )
            for e in entries
        ]

        def txn(t: Any) -> int:
            t.executemany(
                "INSERT INTO agents (host, rpc_port, rpc_path, token_enc, secret_key_enc,"
                " cert_fingerprint, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'online', ?, ?)",
                rows,
            )
            t.execute("SELECT COUNT(*) FROM agents")
            return int(t.fetchone()[0])

        total: int = await service.db.run(txn)
        return total
    finally:
        await service.stopService()


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="insert simulated agents into a myxd store")
    p.add_argument("--data-dir", required=True)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    pid_file = os.path.join(args.data_dir, "twistd.pid")
    if os.path.exists(pid_file):
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().strip()), 0)
            sys.stderr.write("bulk_adopt: myxd is running on this data dir; stop it first\n")
            return 2
        except (OSError, ValueError):
            pass
    entries = read_fleet(args.files)

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    t0 = time.monotonic()

    def report(total: int) -> None:
        print(
            f"adopted {len(entries)} agents into {args.data_dir} "
            f"({total} in the store) in {time.monotonic() - t0:.2f}s"
        )

    def run(reactor: Any) -> Deferred[Any]:
        d = Deferred.fromCoroutine(_adopt(reactor, args.data_dir, entries))
        d.addCallback(report)
        return d

    task.react(run)  # runs the reactor and exits the process with its outcome
    return 0


if __name__ == "__main__":
    sys.exit(main())
