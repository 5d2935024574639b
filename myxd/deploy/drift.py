# -*- test-case-name: tests.daemon.test_drift -*-
"""Version and config drift: which agents differ from what was last deployed.

For each service (``xray``, ``caddy``):

- the expected version is the most common active version among the successful
  targets of the newest deployment of that service that had any;
- each agent's baseline is its own state right after its newest successful
  deployment of the service (configs legitimately differ per node: keys,
  ports), so a config hash that moved since then is drift;
- an agent that should run the service (it has a baseline) and does not is down.

Pure functions over store records: no I/O, nothing to block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from myxd.store.deployments import ServiceRecord, TargetRecord


def service_drift(
    service: str,
    targets: Sequence[TargetRecord],
    current: Sequence[ServiceRecord],
    names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """``targets``: successful targets of this service's deployments, newest first."""
    names = names or {}
    baseline: dict[int, TargetRecord] = {}
    for t in targets:
        baseline.setdefault(t.agent_id, t)
    expected_version = None
    expected_deployment = None
    if targets:
        newest = targets[0].deployment_id
        versions = Counter(
            (t.post_check or {}).get("active_version")
            for t in targets
            if t.deployment_id == newest and (t.post_check or {}).get("active_version")
        )
        expected_deployment = newest
        if versions:
            expected_version = versions.most_common(1)[0][0]
    now = {r.agent_id: r for r in current if r.service == service}
    rows = []
    for agent_id in sorted(set(baseline) | set(now)):
        cur = now.get(agent_id)
        base = baseline.get(agent_id)
        reasons = []
        if cur is None:
            reasons.append("not checked yet")
        else:
            if base is not None and not cur.active:
                reasons.append("service down")
            if expected_version is not None and cur.active_version != expected_version:
                reasons.append(
                    f"version {cur.active_version or 'none'}, expected {expected_version}"
                )
            base_hash = (base.post_check or {}).get("config_sha256") if base else None
            if base_hash and cur.config_sha256 != base_hash:
                reasons.append("config changed since the last deployment")
        rows.append(
            {
                "agent_id": agent_id,
                "name": names.get(agent_id),
                "active": None if cur is None else cur.active,
                "active_version": None if cur is None else cur.active_version,
                "config_sha256": None if cur is None else cur.config_sha256,
                "checked_at": None if cur is None else cur.checked_at,
                "deployment_id": None if base is None else base.deployment_id,
                "drift": reasons,
            }
        )
    return {
        "service": service,
        "expected_version": expected_version,
        "deployment_id": expected_deployment,
        "agents": rows,
        "drifted": sum(1 for r in rows if r["drift"]),
    }
