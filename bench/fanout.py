"""Fan-out through MyX: one bulk ``POST /api/commands``, then wait for every result.

Used by B4 (fan-out) and B7 (peer comparison). Two ways to decide "done":

- ``store``: the daemon's SQLite file is read (read-only, WAL, beside the
  daemon) until every command is ``success``/``failed`` with its exit code and
  its output stored. This is the issue's definition for B4 and adds no load
  to the daemon's API.
- ``api``: a client long-polls ``GET /api/commands/{id}?wait=`` for every
  command until it is complete and has read its output from the API, as an
  operator's tool would (B7 counts this way, since Ansible also prints every
  host's output).
"""

from __future__ import annotations

import base64
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence

from bench.harness import Daemon

FINAL = ("success", "failed")


def wait_store(db_path: str, ids: Sequence[int], timeout: float) -> float:
    """Seconds (since the call) until every command in `ids` is final with output."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    t0 = time.perf_counter()
    marks = ",".join("?" * len(ids))
    sql = (
        f"SELECT COUNT(*) FROM agent_commands WHERE id IN ({marks}) AND "  # noqa: S608
        "status IN ('success', 'failed') AND exit_code IS NOT NULL AND output_offset > 0"
    )
    try:
        while True:
            (done,) = conn.execute(sql, list(ids)).fetchone()
            if done == len(ids):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"only {done} of {len(ids)} commands done in {timeout}s")
            time.sleep(0.003)
    finally:
        conn.close()


def read_via_api(daemon: Daemon, command_id: int, timeout: float) -> Dict[str, Any]:
    """Long-poll one command through the API until complete; returns its output."""
    offset = 0
    data = bytearray()
    deadline = time.time() + timeout
    while True:
        status, body = daemon.api("GET", f"/api/commands/{command_id}?offset={offset}&wait=25")
        if status != 200:
            raise RuntimeError(f"GET command {command_id}: {status} {body}")
        for chunk in body["output"]:
            data += base64.b64decode(chunk["data"])
        offset = body["next_offset"]
        if body["complete"]:
            return {
                "id": command_id,
                "status": body["status"],
                "exit_code": body["exit_code"],
                "output": bytes(data),
            }
        if time.time() > deadline:
            raise RuntimeError(f"command {command_id} not complete in {timeout}s")


def fanout(
    daemon: Daemon,
    agent_ids: Sequence[int] | str,
    command: str,
    args: List[str],
    *,
    done: str = "store",
    timeout: float = 120.0,
    pool: ThreadPoolExecutor | None = None,
) -> Dict[str, Any]:
    """Run `command` on the agents with one bulk call; returns timings and results."""
    db = os.path.join(daemon.data_dir, "myxd.sqlite")
    t0 = time.perf_counter()
    status, body = daemon.api(
        "POST",
        "/api/commands",
        {
            "agents": agent_ids if isinstance(agent_ids, str) else list(agent_ids),
            "command": command,
            "args": args,
            "timeout": 60,
        },
    )
    t_post = time.perf_counter() - t0
    if status != 201:
        raise RuntimeError(f"POST /api/commands: {status} {body}")
    created = body["commands"]
    errors = [c for c in created if "id" not in c]
    if errors:
        raise RuntimeError(f"{len(errors)} commands not created: {errors[:3]}")
    ids = [c["id"] for c in created]
    results: List[Dict[str, Any]] = []
    if done == "store":
        wait_store(db, ids, timeout)
    else:
        own = pool is None
        pool = pool or ThreadPoolExecutor(max_workers=min(200, len(ids)))
        try:
            results = list(pool.map(lambda i: read_via_api(daemon, i, timeout), ids))
        finally:
            if own:
                pool.shutdown()
    total = time.perf_counter() - t0
    return {"post": t_post, "total": total, "ids": ids, "results": results}


def check_outputs(daemon: Daemon, ids: Sequence[int], expected: bytes | None = None) -> int:
    """How many of the commands succeeded with a non-empty output (via the API)."""
    good = 0
    for i in ids:
        r = read_via_api(daemon, i, 60)
        if (
            r["status"] == "success"
            and r["exit_code"] == 0
            and r["output"]
            and (expected is None or r["output"] == expected)
        ):
            good += 1
    return good
