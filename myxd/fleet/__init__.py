"""Fleet work the daemon drives on its own: heartbeats and the command queue.

Both services take the reactor, the store and the RPC client by injection and
never block the reactor.
"""

from myxd.fleet.commands import CommandQueue, CommandUpdate
from myxd.fleet.heartbeat import CycleStats, HeartbeatService

__all__ = ["CommandQueue", "CommandUpdate", "CycleStats", "HeartbeatService"]
