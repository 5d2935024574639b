"""New agent identities: token, secret key, RPC port and RPC path.

Everything random here comes from ``secrets`` (the OS CSPRNG), never from
``random``'s default generator. This module never logs what it generates and
never touches the database itself: the store passes in a ``port_taken`` check so
that ports are unique across the fleet.
"""

from __future__ import annotations

import random
import secrets
import string
from dataclasses import dataclass
from typing import Callable

RPC_PORT_MIN = 8000
RPC_PORT_MAX = 65535
# Linux's default ephemeral range (net.ipv4.ip_local_port_range). A listening
# port in it can be taken by any outgoing connection the target happens to
# make before the agent (re)starts, so new identities stay out of it.
EPHEMERAL_PORTS = range(32768, 61000)

RPC_PATH_MIN_LEN = 16
RPC_PATH_MAX_LEN = 32
RPC_PATH_ALPHABET = string.ascii_letters + string.digits + "_-"

# Ports in 8000-65535 that well-known software listens on by default. An agent
# port on one of these could collide with a service already on the target, and
# stands out to scanners, so new identities never use them. Sources: IANA
# registrations and the defaults of common server software.
WELL_KNOWN_PORTS: frozenset[int] = frozenset(
    {
        8000,
        8001,
        8008,
        8009,
        8010,  # HTTP alternates, dev servers, AJP (8009)
        8006,  # Proxmox VE web UI
        8080,
        8081,
        8082,
        8088,
        8089,  # HTTP proxies/alternates, Splunk mgmt (8089)
        8086,
        8087,  # InfluxDB, Riak
        8118,  # Privoxy
        8123,  # Home Assistant / ClickHouse HTTP
        8125,
        8126,  # StatsD, Datadog APM
        8161,  # ActiveMQ web console
        8181,
        8200,
        8201,  # alternates, HashiCorp Vault
        8300,
        8301,
        8302,
        8500,
        8501,
        8502,
        8600,  # HashiCorp Consul
        8333,  # Bitcoin
        8384,  # Syncthing GUI
        8388,  # Shadowsocks default
        8443,
        8444,  # HTTPS alternates
        8545,
        8546,  # Ethereum JSON-RPC
        8834,  # Nessus
        8843,
        8880,
        8888,  # HTTP(S) alternates, Jupyter (8888)
        8883,  # MQTT over TLS
        8983,  # Apache Solr
        9000,
        9001,  # PHP-FPM, SonarQube, MinIO, Portainer, supervisord
        9042,  # Cassandra CQL
        9043,
        9060,  # WebSphere admin
        9050,
        9051,  # Tor SOCKS / control
        9080,
        9081,  # HTTP alternates
        9090,
        9091,
        9093,
        9094,  # Prometheus, Pushgateway, Alertmanager
        9092,  # Kafka
        9100,
        9101,
        9102,
        9103,
        9104,  # Prometheus exporters (node, ...)
        9115,
        9121,
        9187,  # blackbox, redis and postgres exporters
        9200,
        9300,  # Elasticsearch / OpenSearch
        9418,  # git daemon
        9443,  # HTTPS alternates, Portainer
        9600,  # Logstash API
        9990,
        9993,  # WildFly admin
        9997,
        9998,
        9999,  # Splunk forwarder, misc admin UIs
        10000,  # Webmin
        10050,
        10051,  # Zabbix agent / server
        10250,
        10255,
        10256,
        10257,
        10259,  # Kubernetes node/control plane
        10443,  # HTTPS alternate
        10808,
        10809,  # V2Ray/Xray local proxy defaults
        11211,  # memcached
        15672,
        25672,  # RabbitMQ management, clustering
        16379,
        26379,  # Redis cluster bus, Redis Sentinel
        22000,  # Syncthing
        25565,  # Minecraft
        27015,  # Steam / Source servers
        27017,
        27018,
        27019,
        28017,  # MongoDB
        30033,  # TeamSpeak file transfer
        32400,  # Plex
        50000,
        50070,
        50075,  # Jenkins agents, Hadoop
        51820,  # WireGuard
        61613,
        61614,
        61616,  # ActiveMQ STOMP / OpenWire
    }
)


@dataclass(frozen=True)
class AgentIdentity:
    """What the daemon assigns to a new agent; the agent can never choose these."""

    token: str
    secret_key: str
    rpc_port: int
    rpc_path: str

    def __repr__(self) -> str:
        # Keep the secrets out of any repr that lands in a log or a traceback.
        return (
            f"AgentIdentity(token=<hidden>, secret_key=<hidden>, "
            f"rpc_port={self.rpc_port}, rpc_path=<hidden>)"
        )


def _system_rng() -> random.Random:
    return secrets.SystemRandom()


def is_allowed_port(port: int) -> bool:
    """True when ``port`` may be handed to a new agent (ignoring uniqueness)."""
    return (
        RPC_PORT_MIN <= port <= RPC_PORT_MAX
        and port not in WELL_KNOWN_PORTS
        and port not in EPHEMERAL_PORTS
    )


def new_rpc_path(rng: random.Random | None = None) -> str:
    """A random URL-safe path segment of 16-32 characters from ``[A-Za-z0-9_-]``."""
    r = rng if rng is not None else _system_rng()
    length = r.randint(RPC_PATH_MIN_LEN, RPC_PATH_MAX_LEN)
    return "".join(r.choice(RPC_PATH_ALPHABET) for _ in range(length))


def new_rpc_port(
    port_taken: Callable[[int], bool],
    rng: random.Random | None = None,
    *,
    max_tries: int = 10000,
) -> int:
    """A random allowed port (`is_allowed_port`) for which ``port_taken`` is false.

    Random draws first; if ``max_tries`` of them all hit taken ports (the fleet
    holds most of the range), every allowed port is scanned from a random start,
    so a free port is found whenever one exists. Raises ``RuntimeError`` when
    none is left.
    """
    r = rng if rng is not None else _system_rng()
    for _ in range(max_tries):
        port = r.randint(RPC_PORT_MIN, RPC_PORT_MAX)
        if is_allowed_port(port) and not port_taken(port):
            return port
    allowed = [p for p in range(RPC_PORT_MIN, RPC_PORT_MAX + 1) if is_allowed_port(p)]
    start = r.randrange(len(allowed))
    for port in allowed[start:] + allowed[:start]:
        if not port_taken(port):
            return port
    raise RuntimeError("no free agent RPC port left")


def new_identity(
    port_taken: Callable[[int], bool], rng: random.Random | None = None
) -> AgentIdentity:
    """A fresh identity. Token and secret always come from ``secrets``.

    ``rng`` only drives port and path choice, so tests can make them
    reproducible; it defaults to the OS CSPRNG.
    """
    return AgentIdentity(
        token=secrets.token_urlsafe(32),
        secret_key=secrets.token_urlsafe(32),
        rpc_port=new_rpc_port(port_taken, rng),
        rpc_path=new_rpc_path(rng),
    )
