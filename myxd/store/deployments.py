# -*- test-case-name: tests.daemon.test_store_deployments -*-
"""Deployment records, their per-agent targets, and the services agents run.

A deployment is created with all its targets in one transaction; each target
reserves its agent-side ``command_uid`` then, so a daemon that dies between
creating a target's command and recording it finds the command by that uid
after a restart and never starts a second one.

Rules this module keeps:
- ``vars`` are stored encrypted (they often hold keys: REALITY private keys,
  Trojan passwords); only their names are readable without the key.
- Status changes of a target and of its deployment are separate, small
  transactions; the deployment's final status is computed from its targets
  here, in one place (``summarize``).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import NotFoundError
from myxd.store.db import UNSET, Database, Txn, check, dumps, loads

DEPLOYMENT_STATUSES = ("pending", "running", "success", "partial", "failed", "cancelled")
DEPLOYMENT_FINAL = frozenset({"success", "partial", "failed", "cancelled"})
TARGET_STATUSES = (
    "pending",
    "transferring",
    "running",
    "success",
    "failed",
    "cancelled",
    "skipped",
)
TARGET_FINAL = frozenset({"success", "failed", "cancelled", "skipped"})


@dataclass(frozen=True)
class TargetRecord:
    deployment_id: int
    agent_id: int
    position: int
    command_uid: str
    command_id: int | None
    status: str
    changed: int | None
    ok: int | None
    failed: int | None
    reason: str | None
    bytes_sent: int
    started_at: float | None
    finished_at: float | None
    post_check: dict[str, Any] | None = None  # the deployed service, checked after success


@dataclass(frozen=True)
class DeploymentRecord:
    id: int
    playbook: str
    vars: dict[str, Any] = field(repr=False)  # decrypted
    var_names: list[str]
    artifacts: dict[str, str]  # var -> artifact sha256
    batch_size: int | None
    max_failures: int | None
    timeout: float | None
    status: str
    actor: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    targets: list[TargetRecord]


@dataclass(frozen=True)
class ServiceRecord:
    agent_id: int
    service: str
    installed_version: str | None
    active_version: str | None
    active: bool
    unit_state: str | None
    config_sha256: str | None
    details: dict[str, Any] | None
    checked_at: float


def summarize(statuses: Sequence[str], cancelled: bool = False) -> str:
    """A finished deployment's status from its targets' final statuses."""
    ok = sum(1 for s in statuses if s == "success")
    bad = sum(1 for s in statuses if s in ("failed", "skipped", "cancelled"))
    if cancelled:
        return "cancelled"
    if statuses and ok == len(statuses):
        return "success"
    if ok and bad:
        return "partial"
    return "failed"


def _target(row: sqlite3.Row) -> TargetRecord:
    return TargetRecord(
        deployment_id=row["deployment_id"],
        agent_id=row["agent_id"],
        position=row["position"],
        command_uid=row["command_uid"],
        command_id=row["command_id"],
        status=row["status"],
        changed=row["changed"],
        ok=row["ok"],
        failed=row["failed"],
        reason=row["reason"],
        bytes_sent=row["bytes_sent"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        post_check=loads(row["post_check"]),
    )


class DeploymentStore:
    """Queries on ``deployments``, ``deployment_targets`` and ``agent_services``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- deployments -------------------------------------------------------------

    def create_deployment(
        self,
        *,
        playbook: str,
        vars: Mapping[str, Any],
        artifacts: Mapping[str, str],
        agent_ids: Sequence[int],
        batch_size: int | None,
        max_failures: int | None,
        timeout: float | None,
        actor: str,
    ) -> Deferred[DeploymentRecord]:
        """The deployment ``pending`` with one ``pending`` target per agent, in order.

        NotFoundError naming the first unknown agent; nothing is written then.
        """
        now = self._db.now()

        def txn(t: Txn) -> DeploymentRecord:
            for aid in agent_ids:
                t.execute("SELECT 1 FROM agents WHERE id = ?", (aid,))
                if t.fetchone() is None:
                    raise NotFoundError(f"agent {aid} not found")
            t.execute(
                "INSERT INTO deployments (playbook, vars_enc, var_names, artifacts, batch_size,"
                " max_failures, timeout, status, actor, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                (
                    playbook,
                    self._db.box().encrypt_json(dict(vars)),
                    dumps(sorted(vars)),
                    dumps(dict(artifacts)),
                    batch_size,
                    max_failures,
                    timeout,
                    actor,
                    now,
                    now,
                ),
            )
            dep_id = int(t.lastrowid or 0)
            t.executemany(
                "INSERT INTO deployment_targets (deployment_id, agent_id, position, command_uid,"
                " status) VALUES (?, ?, ?, ?, 'pending')",
                [(dep_id, aid, i, uuid.uuid4().hex) for i, aid in enumerate(agent_ids)],
            )
            return self._get(t, dep_id)

        return self._db.run(txn)

    def get_deployment(self, deployment_id: int) -> Deferred[DeploymentRecord | None]:
        def txn(t: Txn) -> DeploymentRecord | None:
            try:
                return self._get(t, deployment_id)
            except NotFoundError:
                return None

        return self._db.run(txn)

    def list_deployments(
        self, *, limit: int = 50, before_id: int | None = None, status: str | None = None
    ) -> Deferred[list[DeploymentRecord]]:
        """Newest first, with their targets."""

        def txn(t: Txn) -> list[DeploymentRecord]:
            if limit < 0:
                raise ValueError("limit must not be negative")
            where: list[str] = []
            args: list[Any] = []
            if before_id is not None:
                where.append("id < ?")
                args.append(before_id)
            if status is not None:
                check(status, DEPLOYMENT_STATUSES, "status")
                where.append("status = ?")
                args.append(status)
            sql = "SELECT id FROM deployments"
            if where:
                sql += " WHERE " + " AND ".join(where)
            t.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
            return [self._get(t, r["id"]) for r in t.fetchall()]

        return self._db.run(txn)

    def list_unfinished_deployments(self) -> Deferred[list[DeploymentRecord]]:
        """Deployments to resume after a restart, oldest first."""

        def txn(t: Txn) -> list[DeploymentRecord]:
            t.execute(
                "SELECT id FROM deployments WHERE status IN ('pending', 'running') ORDER BY id"
            )
            return [self._get(t, r["id"]) for r in t.fetchall()]

        return self._db.run(txn)

    def set_deployment_status(self, deployment_id: int, status: str) -> Deferred[None]:
        now = self._db.now()

        def txn(t: Txn) -> None:
            check(status, DEPLOYMENT_STATUSES, "status")
            sets = "status = ?, updated_at = ?"
            args: list[Any] = [status, now]
            if status == "running":
                sets += ", started_at = COALESCE(started_at, ?)"
                args.append(now)
            if status in DEPLOYMENT_FINAL:
                sets += ", finished_at = COALESCE(finished_at, ?)"
                args.append(now)
            t.execute(f"UPDATE deployments SET {sets} WHERE id = ?", (*args, deployment_id))  # noqa: S608
            if not t.rowcount:
                raise NotFoundError(f"deployment {deployment_id} not found")

        return self._db.run(txn)

    def update_target(
        self,
        deployment_id: int,
        agent_id: int,
        *,
        status: str = UNSET,
        command_id: int | None = UNSET,
        changed: int | None = UNSET,
        ok: int | None = UNSET,
        failed: int | None = UNSET,
        reason: str | None = UNSET,
        bytes_sent: int = UNSET,
        post_check: dict[str, Any] | None = UNSET,
    ) -> Deferred[TargetRecord]:
        now = self._db.now()
        fields = {
            k: v
            for k, v in (
                ("status", status),
                ("command_id", command_id),
                ("changed", changed),
                ("ok", ok),
                ("failed", failed),
                ("reason", reason),
                ("bytes_sent", bytes_sent),
                ("post_check", post_check if post_check in (None, UNSET) else dumps(post_check)),
            )
            if v is not UNSET
        }

        def txn(t: Txn) -> TargetRecord:
            sets = [f"{k} = ?" for k in fields]
            args: list[Any] = list(fields.values())
            if "status" in fields:
                check(str(fields["status"]), TARGET_STATUSES, "status")
                if fields["status"] in ("transferring", "running"):
                    sets.append("started_at = COALESCE(started_at, ?)")
                    args.append(now)
                if fields["status"] in TARGET_FINAL:
                    sets.append("finished_at = COALESCE(finished_at, ?)")
                    args.append(now)
            if sets:
                t.execute(
                    f"UPDATE deployment_targets SET {', '.join(sets)}"  # noqa: S608
                    " WHERE deployment_id = ? AND agent_id = ?",
                    (*args, deployment_id, agent_id),
                )
            t.execute(
                "SELECT * FROM deployment_targets WHERE deployment_id = ? AND agent_id = ?",
                (deployment_id, agent_id),
            )
            row = t.fetchone()
            if row is None:
                raise NotFoundError(f"deployment {deployment_id} has no agent {agent_id}")
            return _target(row)

        return self._db.run(txn)

    def successful_targets(self, playbooks: Sequence[str]) -> Deferred[list[TargetRecord]]:
        """Successful targets of deployments of ``playbooks``, newest deployment first."""

        def txn(t: Txn) -> list[TargetRecord]:
            if not playbooks:
                return []
            # Only "?" placeholders are formatted in, one per playbook.
            marks = ", ".join("?" for _ in playbooks)
            sql = (
                "SELECT dt.* FROM deployment_targets dt JOIN deployments d"  # noqa: S608
                " ON d.id = dt.deployment_id"
                f" WHERE dt.status = 'success' AND d.playbook IN ({marks})"
                " ORDER BY d.id DESC, dt.position"
            )
            t.execute(sql, tuple(playbooks))
            return [_target(r) for r in t.fetchall()]

        return self._db.run(txn)

    def running_artifact_users(self, artifact_id: str) -> Deferred[list[int]]:
        """Ids of unfinished deployments that use the artifact."""

        def txn(t: Txn) -> list[int]:
            t.execute(
                "SELECT id, artifacts FROM deployments WHERE status IN ('pending', 'running')"
            )
            return [r["id"] for r in t.fetchall() if artifact_id in loads(r["artifacts"]).values()]

        return self._db.run(txn)

    def _get(self, t: Txn, deployment_id: int) -> DeploymentRecord:
        t.execute("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        row = t.fetchone()
        if row is None:
            raise NotFoundError(f"deployment {deployment_id} not found")
        t.execute(
            "SELECT * FROM deployment_targets WHERE deployment_id = ? ORDER BY position",
            (deployment_id,),
        )
        targets = [_target(r) for r in t.fetchall()]
        return DeploymentRecord(
            id=row["id"],
            playbook=row["playbook"],
            vars=self._db.box().decrypt_json(row["vars_enc"]),
            var_names=loads(row["var_names"]),
            artifacts=loads(row["artifacts"]),
            batch_size=row["batch_size"],
            max_failures=row["max_failures"],
            timeout=row["timeout"],
            status=row["status"],
            actor=row["actor"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            targets=targets,
        )

    # -- services (drift) --------------------------------------------------------

    def record_services(
        self, agent_id: int, services: Mapping[str, Mapping[str, Any]]
    ) -> Deferred[None]:
        """Replace what is known of the agent's services with ``services``."""
        now = self._db.now()

        def txn(t: Txn) -> None:
            t.execute("DELETE FROM agent_services WHERE agent_id = ?", (agent_id,))
            t.executemany(
                "INSERT INTO agent_services (agent_id, service, installed_version,"
                " active_version, active, unit_state, config_sha256, details, checked_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        agent_id,
                        name,
                        _str(info.get("installed_version")),
                        _str(info.get("active_version")),
                        1 if info.get("active") else 0,
                        _str(info.get("unit_state")),
                        _str(info.get("config_sha256")),
                        dumps(dict(info)),
                        now,
                    )
                    for name, info in services.items()
                ],
            )

        return self._db.run(txn)

    def list_services(self, agent_id: int | None = None) -> Deferred[list[ServiceRecord]]:
        def txn(t: Txn) -> list[ServiceRecord]:
            if agent_id is None:
                t.execute("SELECT * FROM agent_services ORDER BY agent_id, service")
            else:
                t.execute(
                    "SELECT * FROM agent_services WHERE agent_id = ? ORDER BY service",
                    (agent_id,),
                )
            return [
                ServiceRecord(
                    agent_id=r["agent_id"],
                    service=r["service"],
                    installed_version=r["installed_version"],
                    active_version=r["active_version"],
                    active=bool(r["active"]),
                    unit_state=r["unit_state"],
                    config_sha256=r["config_sha256"],
                    details=loads(r["details"]),
                    checked_at=r["checked_at"],
                )
                for r in t.fetchall()
            ]

        return self._db.run(txn)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
