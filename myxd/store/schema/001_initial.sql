-- MyX store, schema version 1.
-- Applied inside one transaction by myxd.store.migrate; never edit a released
-- file: add NNN_<name>.sql with the upgrade steps instead.
-- Times are float seconds since the epoch. *_enc columns hold Fernet tokens
-- (myxd.store.crypto); plaintext secrets never reach this file.

CREATE TABLE servers (
    id                   INTEGER PRIMARY KEY,
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
    updated_at           REAL    NOT NULL
);

CREATE TABLE agents (
    id               INTEGER PRIMARY KEY,
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
    updated_at       REAL    NOT NULL
);
CREATE INDEX agents_status ON agents (status);

CREATE TABLE agent_commands (
    id            INTEGER PRIMARY KEY,
    agent_id      INTEGER NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    command_uid   TEXT    NOT NULL UNIQUE,       -- the agent-side command_id
    kind          TEXT    NOT NULL CHECK (kind IN ('command', 'ansible')),
    command       TEXT    NOT NULL,              -- argv[0], or the playbook path
    args          TEXT    NOT NULL,              -- JSON list
    timeout       REAL,
    extra         TEXT,                          -- JSON: env/cwd, or extra_vars
    status        TEXT    NOT NULL
                  CHECK (status IN ('pending', 'running', 'success', 'failed')),
    exit_code     INTEGER,
    reason        TEXT,                          -- why it failed
    result        TEXT,                          -- JSON: the agent's final result
    attempts      INTEGER NOT NULL DEFAULT 0,
    output_offset INTEGER NOT NULL DEFAULT 0,    -- bytes of the combined stream stored
    created_at    REAL    NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    updated_at    REAL    NOT NULL
);
CREATE INDEX agent_commands_agent ON agent_commands (agent_id, id);
CREATE INDEX agent_commands_status ON agent_commands (status);

-- The combined output stream, one row per stored chunk, keyed by its first
-- byte's offset. A chunk never overlaps another: append_output stores only
-- bytes past agent_commands.output_offset, in the same transaction.
CREATE TABLE command_output (
    command_id INTEGER NOT NULL REFERENCES agent_commands (id) ON DELETE CASCADE,
    offset     INTEGER NOT NULL CHECK (offset >= 0),
    stream     TEXT    NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    data       BLOB    NOT NULL,
    PRIMARY KEY (command_id, offset)
) WITHOUT ROWID;

CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    outcome    TEXT NOT NULL,
    details    TEXT                             -- JSON
);

CREATE TABLE installs (
    id          INTEGER PRIMARY KEY,
    server_id   INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL CHECK (kind IN ('install', 'reinstall', 'uninstall')),
    status      TEXT    NOT NULL,
    error       TEXT,
    started_at  REAL    NOT NULL,
    finished_at REAL
);
CREATE INDEX installs_server ON installs (server_id, id);

CREATE TABLE install_steps (
    id          INTEGER PRIMARY KEY,             -- gives the steps their order
    install_id  INTEGER NOT NULL REFERENCES installs (id) ON DELETE CASCADE,
    step        TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped')),
    log         TEXT,
    error       TEXT,
    started_at  REAL    NOT NULL,
    finished_at REAL,
    UNIQUE (install_id, step)
);
