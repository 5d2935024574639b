# -*- test-case-name: tests.daemon.test_netpolicy -*-
"""Which networks the daemon may reach for SSH installs and agent adoption.

The setting ``allowed_target_networks`` (a comma-separated CIDR list; default
any address) is a hardening option: a daemon whose admin token leaks cannot be
made to open SSH or RPC connections into networks it has no business in. A
host name is resolved (in a worker thread, never on the reactor) and every
address it resolves to must be inside an allowed network.

Checked where a target enters the daemon (a new server, an adopted agent) and
again at each install's connect step, so a name that now resolves elsewhere
is refused too. Never logs more than the host and the refused address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Union

from twisted.internet.threads import deferToThreadPool

from myxd.errors import MyxError

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
ANY = "0.0.0.0/0, ::/0"


class TargetNotAllowed(MyxError):
    """The target is outside ``allowed_target_networks`` (HTTP 400, field ``host``)."""

    field = "host"


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"127.0.0.0/8, 10.1.0.0/16"`` -> networks; ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from None
    if not out:
        raise ValueError("must name at least one network (0.0.0.0/0, ::/0 for any)")
    return tuple(out)


class TargetPolicy:
    """``check(host)`` raises TargetNotAllowed unless every address of ``host`` is allowed."""

    def __init__(self, networks: str, reactor: Any) -> None:
        self.networks = parse_networks(networks)
        self._reactor = reactor
        self.allows_everything = any(
            n.prefixlen == 0 for n in self.networks if n.version == 4
        ) and any(n.prefixlen == 0 for n in self.networks if n.version == 6)

    def allows_address(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks)

    async def check(self, host: str) -> None:
        if self.allows_everything:
            return
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self._resolve(host)
        for address in addresses:
            if not self.allows_address(address):
                raise TargetNotAllowed(
                    f"host: {host} ({address}) is outside allowed_target_networks"
                    if address != host
                    else f"host: {host} is outside allowed_target_networks"
                )

    async def _resolve(self, host: str) -> list[str]:
        def lookup() -> list[str]:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError:
                return []
            return sorted({str(info[4][0]) for info in infos})

        found: list[str] = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), lookup
        )
        if not found:
            raise TargetNotAllowed(f"host: {host} does not resolve to any address")
        return found
