"""B5: log latency, from a process writing a line to that line being readable from
the admin API, at 10 / 100 / 1,000 concurrent streams, long-poll vs plain 1 s polling.

    .venv/bin/python -m bench.b5_log_latency [--streams 10,100,1000] [--seconds 30]

One simulator process serves ``--agents`` agents. For each daemon mode, a fresh
``twistd -n myxd`` adopts them (bulk, then one heartbeat cycle warms the
connections), and for each stream count N it starts N commands (spread over the
agents, several per agent when N exceeds them), each a bash loop that prints
``$EPOCHREALTIME`` (the time it writes the line) every ``--period`` seconds,
starting at a random offset. A client (asyncio, one keep-alive connection per
stream, in this process) long-polls ``GET /api/commands/{id}?offset=&wait=25``
for every command and, for every line it reads, takes the latency
``now - line``. Counted are the lines written during ``--seconds`` seconds,
starting ``--warmup`` seconds after every stream has delivered its first line:
one simulator host starts the N bash processes one after another (about 20 ms
each on this machine, so 20 s for 1,000), which is not the log path and which
N real hosts would do in parallel.

Modes, side by side in one run (one after the other, same agents and load):
- long-poll: the daemon's log poller passes ``wait=10`` to ``get_command_log``
  (the agent answers within 100 ms of output), ``log_poll_interval`` 1 s;
- poll-1s: the architecture's plain polling, ``wait=0``, every 1 s.

The daemon's poll-lag histogram (how late each log poll ran after it was due)
shows whether its poll loop keeps up at 1,000 streams.

Daemon CPU per unit of work (issue 14 §3), from ``/proc/PID/stat``: per streamed
line, the daemon's CPU during the counted window over the lines written in it;
per agent long-poll wake-up, its CPU over the whole phase over the
``get_command_log`` calls it made to agents in the phase (each is one wake-up of
a command's poller: the agent answered with output, or at the end of ``wait``);
and per API long-poll answered (one ``GET /api/commands/{id}?wait=`` of the
client), the same CPU over those answers. Each figure charges all of the
daemon's CPU to one kind of work, so they are upper bounds, not a split.

Targets (issue 5): long-poll p50 <= 50 ms, p99 <= 250 ms at 100 streams; the
poll loop does not slip at 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from bench.harness import (
    Daemon,
    Sampler,
    Sim,
    adopt_store,
    load,
    percentile,
    print_header,
)

STREAM_SCRIPT = (
    'exec 9<> <(:); read -t "0.$(printf %03d $((RANDOM % 1000)))" -u 9; '
    'for ((i = 0; i < {lines}; i++)); do echo "$EPOCHREALTIME"; read -t {period} -u 9; done; exit 0'
)


class APIClient:
    """One keep-alive HTTP/1.1 connection to the admin API (Content-Length or chunked)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.head = f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def get(self, path: str) -> Tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
        status = int((await self.reader.readline()).split()[1])
        headers: Dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        self.reader = None


async def follow(
    port: int,
    token: str,
    command_id: int,
    seen: List[Tuple[float, float]],
    first: Dict[str, Any],
    deadline: float,
) -> Tuple[int, int]:
    """Long-poll one command until complete; note (written, latency) of each line.

    Returns (lines read, API requests answered).

    ``first`` tracks which commands delivered a line: once all have, its
    ``ready`` is set (lines before that moment include the start-up of the
    streams themselves, not the log path, and are not counted).
    """
    client = APIClient(port, token)
    offset = 0
    pending = b""
    lines = 0
    gets = 0
    try:
        while time.time() < deadline:
            status, raw = await client.get(f"/api/commands/{command_id}?offset={offset}&wait=25")
            now = time.time()
            gets += 1
            if status != 200:
                raise RuntimeError(f"GET /api/commands/{command_id}: {status} {raw[:200]!r}")
            body = json.loads(raw)
            for chunk in body["output"]:
                pending += base64.b64decode(chunk["data"])
            *done, pending = pending.split(b"\n")
            for line in done:
                try:
                    written = float(line.decode().replace(",", "."))
                except ValueError:
                    continue
                lines += 1
                seen.append((written, now - written))
                if command_id not in first["ids"]:
                    first["ids"].add(command_id)
                    if len(first["ids"]) == first["streams"]:
                        first["ready"] = now
            offset = body["next_offset"]
            if body["complete"]:
                break
    finally:
        client.close()
    return lines, gets


def histogram(text: str, name: str) -> Tuple[List[Tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], count, sum) of one Prometheus histogram."""
    buckets: List[Tuple[float, float]] = []
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.split()[-1])))
        elif line.startswith(name + "_count "):
            count = float(line.split()[-1])
        elif line.startswith(name + "_sum "):
            total = float(line.split()[-1])
    return buckets, count, total


def hist_quantile(
    before: List[Tuple[float, float]], after: List[Tuple[float, float]], q: float
) -> float:
    """Upper bucket bound below which a fraction q of the new observations fall."""
    delta = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    if not delta or delta[-1][1] <= 0:
        return float("nan")
    target = q * delta[-1][1]
    for le, c in delta:
        if c >= target:
            return le
    return math.inf


def start_allowance(streams: int) -> float:
    """Seconds to let N streams start (a simulator host spawns them one by one)."""
    return 5.0 + 0.03 * streams


async def run_streams(
    daemon: Daemon, agent_ids: List[int], streams: int, seconds: float, period: float, warmup: float
) -> Dict[str, Any]:
    """N streams; latencies of lines written in `seconds` from `warmup` s after the
    moment every stream had delivered its first line."""
    allowance = start_allowance(streams)
    lines_each = int((allowance + warmup + seconds + 2.0) / period) + 1
    script = STREAM_SCRIPT.format(lines=lines_each, period=period)
    command_ids: List[int] = []
    loop = asyncio.get_running_loop()
    t_start = time.time()
    while len(command_ids) < streams:
        batch = agent_ids[: min(len(agent_ids), streams - len(command_ids))]
        status, body = await loop.run_in_executor(
            None,
            lambda b=batch: daemon.api(  # type: ignore[misc]
                "POST",
                "/api/commands",
                {
                    "agents": b,
                    "command": "bash",
                    "args": ["-c", script],
                    "timeout": lines_each * period + 120,
                },
            ),
        )
        if status != 201:
            raise RuntimeError(f"POST /api/commands: {status} {body}")
        command_ids += [c["id"] for c in body["commands"]]
    seen: List[Tuple[float, float]] = []
    first: Dict[str, Any] = {"ids": set(), "streams": streams, "ready": None}
    deadline = t_start + lines_each * period + 180
    counts = await asyncio.gather(
        *[follow(daemon.port, daemon.token, cid, seen, first, deadline) for cid in command_ids]
    )
    ready = first["ready"]
    if ready is None:
        raise RuntimeError("not every stream delivered a line")
    lo, hi = ready + warmup, ready + warmup + seconds
    latencies = [lat for written, lat in seen if lo <= written <= hi]
    return {
        "latencies": latencies,
        "lines": sum(c[0] for c in counts),
        "gets": sum(c[1] for c in counts),
        "commands": len(command_ids),
        "elapsed": time.time() - t_start,
        "ready_after": ready - t_start,
        "window": (lo, hi),
    }


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B5 log latency")
    p.add_argument("--streams", default="10,100,1000")
    p.add_argument(
        "--agents",
        type=int,
        default=1000,
        help="simulated agents; streams are spread over them (default: one each)",
    )
    p.add_argument("--seconds", type=float, default=30.0, help="counted seconds per phase")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--period", type=float, default=1.0, help="seconds between lines")
    p.add_argument("--modes", default="long-poll,poll-1s")
    p.add_argument("--shards", type=int, default=2, help="simulator processes")
    p.add_argument(
        "--pool-per-host",
        type=int,
        default=0,
        help="daemon rpc_pool_max_per_host (0: the daemon's default)",
    )
    args = p.parse_args(argv)
    print_header("B5 log latency")
    stream_counts = [int(s) for s in args.streams.split(",")]
    modes = {
        "long-poll": {"log_poll_wait": 10, "log_poll_interval": 1},
        "poll-1s": {"log_poll_wait": 0, "log_poll_interval": 1},
    }
    table: Dict[Tuple[str, int], Dict[str, Any]] = {}
    with Sim(args.agents, shards=args.shards, extra=["--max-concurrent", "64"]) as sim:
        sim.start()
        sim_samplers = [Sampler(pid, 0.1, children=True) for pid in sim.pids]
        for mode in args.modes.split(","):
            flags = {
                "heartbeat_min_interval": 600,
                "heartbeat_max_interval": 600,
                "max_log_pollers": 2000,
                **modes[mode],
            }
            if args.pool_per_host:
                flags["rpc_pool_max_per_host"] = args.pool_per_host
            env = (
                {"PYTHONPATH": os.environ["B5_PYTHONPATH"]}
                if os.environ.get("B5_PYTHONPATH")
                else None
            )
            with Daemon(flags=flags, env=env) as daemon:
                adopt_store(daemon.data_dir, sim.files)
                daemon.start()
                daemon.wait_cycles(1, 300)
                ids = list(range(1, args.agents + 1))
                sampler = Sampler(daemon.pid, 0.1)
                for n in stream_counts:
                    before = histogram(daemon.metrics(), "myxd_log_poll_lag_seconds")
                    t0 = time.time()
                    own0 = time.process_time()
                    r = asyncio.run(
                        run_streams(daemon, ids, n, args.seconds, args.period, args.warmup)
                    )
                    t1 = time.time()
                    own = time.process_time() - own0
                    after = histogram(daemon.metrics(), "myxd_log_poll_lag_seconds")
                    lat = r["latencies"]
                    w0, w1 = r["window"]
                    polls = after[1] - before[1]
                    phase_cpu = sampler.cpu_between(t0, t1)
                    window_cpu = sampler.cpu_between(w0, w1)
                    row = {
                        "p50": percentile(lat, 50),
                        "p99": percentile(lat, 99),
                        "max": max(lat) if lat else float("nan"),
                        "lines": len(lat),
                        "lag_p50": hist_quantile(before[0], after[0], 0.5),
                        "lag_p99": hist_quantile(before[0], after[0], 0.99),
                        "lag_mean": (after[2] - before[2]) / polls if polls else float("nan"),
                        "polls_per_s": polls / (t1 - t0),
                        "cpu_pct": 100 * window_cpu / (w1 - w0),
                        "ms_per_line": 1000 * window_cpu / len(lat) if lat else float("nan"),
                        "ms_per_poll": 1000 * phase_cpu / polls if polls else float("nan"),
                        "ms_per_get": 1000 * phase_cpu / r["gets"] if r["gets"] else float("nan"),
                        "sim_pct": 100
                        * sum(x.cpu_between(w0, w1) for x in sim_samplers)
                        / (w1 - w0),
                        "client_pct": 100 * own / (t1 - t0),
                        "ready_after": r["ready_after"],
                    }
                    table[(mode, n)] = row
                    print(
                        f"{mode:9s} {n:5d} streams: {row['lines']} lines, latency p50 "
                        f"{1000 * row['p50']:.0f} ms p99 {1000 * row['p99']:.0f} ms max "
                        f"{1000 * row['max']:.0f} ms; {row['polls_per_s']:.0f} agent polls/s, "
                        f"poll lag p50 <= {row['lag_p50']:g}s p99 <= {row['lag_p99']:g}s "
                        f"mean {row['lag_mean']:.3f}s; CPU % of one core: daemon "
                        f"{row['cpu_pct']:.0f}, simulated agents + their commands "
                        f"{row['sim_pct']:.0f}, API client {row['client_pct']:.0f}; "
                        f"all streams up after {row['ready_after']:.1f}s, phase {t1 - t0:.0f}s "
                        f"(load {load()})"
                    )
                    print(
                        f"{'':9s} {'':5s}          daemon CPU: {row['ms_per_line']:.3f} ms per "
                        f"streamed line, {row['ms_per_poll']:.3f} ms per agent long-poll wake-up "
                        f"({polls:.0f} in the phase), {row['ms_per_get']:.3f} ms per API "
                        f"long-poll answered ({r['gets']} in the phase)"
                    )
                    sys.stdout.flush()
                sampler.stop()
        for x in sim_samplers:
            x.stop()
    print()
    print(f"B5 result ({args.seconds:g} s per phase, one line per stream every {args.period:g} s):")
    print(
        "  streams | long-poll p50 / p99      | poll-1s p50 / p99        | poll lag p99 "
        "(long-poll / poll-1s)"
    )
    for n in stream_counts:
        lp = table.get(("long-poll", n))
        pl = table.get(("poll-1s", n))

        def cell(row: Optional[Dict[str, Any]]) -> str:
            if row is None:
                return " " * 24
            return f"{1000 * row['p50']:6.0f} / {1000 * row['p99']:6.0f} ms      "

        def lag(row: Optional[Dict[str, Any]]) -> str:
            return "-" if row is None else f"<= {row['lag_p99']:g}s"

        print(f"  {n:7d} | {cell(lp)} | {cell(pl)} | {lag(lp)} / {lag(pl)}")
    print("  daemon CPU per streamed line / per agent long-poll wake-up / per API answer:")
    for (mode, n), row in table.items():
        print(
            f"  {mode:9s} {n:5d}: {row['ms_per_line']:.3f} / {row['ms_per_poll']:.3f} / "
            f"{row['ms_per_get']:.3f} ms"
        )
    lp100 = table.get(("long-poll", 100))
    if lp100:
        ok = lp100["p50"] <= 0.050 and lp100["p99"] <= 0.250
        print(
            f"  target long-poll p50 <= 50 ms, p99 <= 250 ms at 100 streams: "
            f"{'MET' if ok else 'NOT MET'}"
        )
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
