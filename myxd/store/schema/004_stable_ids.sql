-- MyX store, schema version 4: ids are never used twice.
--
-- INTEGER PRIMARY KEY without AUTOINCREMENT hands out max(id) + 1, so the
-- server (agent, command) added after the newest one was deleted got the
-- deleted one's id, and older events, links and CLI output naming "server 3"
-- then pointed at the new server. SQLite cannot add AUTOINCREMENT in place:
-- each table is rebuilt with the same columns in the same order, and its
-- indexes made again. Foreign keys are off while a migration runs
-- (myxd.store.migrate), so dropping the old table cascades nothing; the
-- migration's foreign_key_check proves the rows still line up.

CREATE TABLE servers_v4 (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    name                 TEXT    NOT NULL,
    host                 TEXT    NOT NULL,
    ssh_port             INTEGER NOT NULL CHECK (ssh_port BETWEEN 1 AND 65535),
    username             TEXT    NOT NULL,
    auth_enc             BLOB,                   -- JSON {"password"} | {"private_key","passphrase"}; NULL = no creds
    sudo_enc             BLOB    NOT NULL,       -- JSON {"mode","password"}
    host_key_fingerprint TEXT,                   -- user-given pin
    host_key             TEXT,                   -- trusted key (TOFU), OpenSSH public key line
    status               TEXT    NOT NULL DEFAULT 'new'
                         CHECK (status IN ('new', 'installing', 'installed', 'failed',
                                           'needs_attention', 'uninstalled')),
    status_reason        TEXT,
    created_at           REAL    NOT NULL,
    updated_at           REAL    NOT NULL,
    tags TEXT NOT NULL DEFAULT '');
INSERT INTO servers_v4 (id, name, host, ssh_port, username, auth_enc, sudo_enc, host_key_fingerprint, host_key, status, status_reason, created_at, updated_at, tags)
    SELECT id, name, host, ssh_port, username, auth_enc, sudo_enc, host_key_fingerprint, host_key, status, status_reason, created_at, updated_at, tags FROM servers;
DROP TABLE servers;
ALTER TABLE servers_v4 RENAME TO servers;

CREATE TABLE agents_v4 (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id        INTEGER UNIQUE REFERENCES servers (id) ON DELETE CASCADE,
    host             TEXT    NOT NULL,
    rpc_port         INTEGER NOT NULL UNIQUE CHECK (rpc_port BETWEEN 1 AND 65535),
    rpc_path         TEXT    NOT NULL,
    token_enc        BLOB    NOT NULL,
    secret_key_enc   BLOB    NOT NULL,
    cert_fingerprint TEXT    NOT NULL,
    status           TEXT    NOT NULL
                     CHECK (status IN ('online', 'offline', 'installing', 'error')),
    status_reason    TEXT,
    rpc_supported    INTEGER NOT NULL DEFAULT 0,
    rpc_last_check   REAL,
    rpc_last_success REAL,
    last_heartbeat   REAL,
    version          TEXT,
    details          TEXT,                       -- JSON: last get_status result
    failed_cycles    INTEGER NOT NULL DEFAULT 0, -- consecutive failed heartbeat cycles
    total_failures   INTEGER NOT NULL DEFAULT 0, -- failed heartbeat cycles ever
    last_error_kind  TEXT,                       -- retryable | auth | final
    last_latency     REAL,                       -- seconds, last successful heartbeat
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    name TEXT, tags TEXT NOT NULL DEFAULT '');
INSERT INTO agents_v4 (id, server_id, host, rpc_port, rpc_path, token_enc, secret_key_enc, cert_fingerprint, status, status_reason, rpc_supported, rpc_last_check, rpc_last_success, last_heartbeat, version, details, failed_cycles, total_failures, last_error_kind, last_latency, created_at, updated_at, name, tags)
    SELECT id, server_id, host, rpc_port, rpc_path, token_enc, secret_key_enc, cert_fingerprint, status, status_reason, rpc_supported, rpc_last_check, rpc_last_success, last_heartbeat, version, details, failed_cycles, total_failures, last_error_kind, last_latency, created_at, updated_at, name, tags FROM agents;
DROP TABLE agents;
ALTER TABLE agents_v4 RENAME TO agents;
CREATE INDEX agents_status ON agents (status);

CREATE TABLE agent_commands_v4 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
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
INSERT INTO agent_commands_v4 (id, agent_id, command_uid, kind, command, args, timeout, extra, status, exit_code, reason, result, attempts, output_offset, created_at, started_at, finished_at, updated_at)
    SELECT id, agent_id, command_uid, kind, command, args, timeout, extra, status, exit_code, reason, result, attempts, output_offset, created_at, started_at, finished_at, updated_at FROM agent_commands;
DROP TABLE agent_commands;
ALTER TABLE agent_commands_v4 RENAME TO agent_commands;
CREATE INDEX agent_commands_agent ON agent_commands (agent_id, id);
CREATE INDEX agent_commands_status ON agent_commands (status);
CREATE INDEX agent_commands_created ON agent_commands (created_at);
