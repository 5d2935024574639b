-- MyX store, schema version 3 (issue #9): names and tags, cancelled/timed_out
-- command statuses, and no phantom agents.
--
-- Tags are stored as ",a,b," (lower-cased, sorted) so one tag is matched with
-- LIKE '%,tag,%'; an empty set is ''.

ALTER TABLE servers ADD COLUMN tags TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN name TEXT;           -- an adopted agent's own name
ALTER TABLE agents ADD COLUMN tags TEXT NOT NULL DEFAULT '';

-- An agent whose install never finished has no certificate fingerprint: it was
-- never an agent. Failed adds used to leave such rows, shown as "offline".
DELETE FROM agents WHERE cert_fingerprint = '';

-- agent_commands gains the final statuses cancelled and timed_out: SQLite
-- cannot change a CHECK in place, so the table is rebuilt (same columns).
CREATE TABLE agent_commands_v3 (
    id            INTEGER PRIMARY KEY,
    agent_id      INTEGER NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    command_uid   TEXT    NOT NULL UNIQUE,
    kind          TEXT    NOT NULL CHECK (kind IN ('command', 'ansible')),
    command       TEXT    NOT NULL,
    args          TEXT    NOT NULL,
    timeout       REAL,
    extra         TEXT,
    status        TEXT    NOT NULL
                  CHECK (status IN ('pending', 'running', 'success', 'failed',
                                    'cancelled', 'timed_out')),
    exit_code     INTEGER,
    reason        TEXT,
    result        TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    output_offset INTEGER NOT NULL DEFAULT 0,
    created_at    REAL    NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    updated_at    REAL    NOT NULL
);
INSERT INTO agent_commands_v3
    SELECT id, agent_id, command_uid, kind, command, args, timeout, extra, status,
           exit_code, reason, result, attempts, output_offset, created_at, started_at,
           finished_at, updated_at
    FROM agent_commands WHERE agent_id IN (SELECT id FROM agents);
-- Output and deployment links of commands dropped with their phantom agent.
DELETE FROM command_output WHERE command_id NOT IN (SELECT id FROM agent_commands_v3);
UPDATE deployment_targets SET command_id = NULL
    WHERE command_id IS NOT NULL AND command_id NOT IN (SELECT id FROM agent_commands_v3);
DELETE FROM deployment_targets WHERE agent_id NOT IN (SELECT id FROM agents);
DELETE FROM agent_services WHERE agent_id NOT IN (SELECT id FROM agents);
DROP TABLE agent_commands;
ALTER TABLE agent_commands_v3 RENAME TO agent_commands;
CREATE INDEX agent_commands_agent ON agent_commands (agent_id, id);
CREATE INDEX agent_commands_status ON agent_commands (status);
CREATE INDEX agent_commands_created ON agent_commands (created_at);
