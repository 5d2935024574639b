-- MyX store, schema version 2: deployments across the fleet, and the services
-- each agent runs (drift). See myxd/store/deployments.py.

CREATE TABLE deployments (
    id           INTEGER PRIMARY KEY,
    playbook     TEXT    NOT NULL,
    vars_enc     BLOB    NOT NULL,               -- Fernet(JSON object): vars may hold keys
    var_names    TEXT    NOT NULL,               -- JSON list, shown by the API
    artifacts    TEXT    NOT NULL,               -- JSON {var: sha256}
    batch_size   INTEGER CHECK (batch_size IS NULL OR batch_size >= 1),
    max_failures INTEGER CHECK (max_failures IS NULL OR max_failures >= 0),
    timeout      REAL,
    status       TEXT    NOT NULL
                 CHECK (status IN ('pending', 'running', 'success', 'partial', 'failed',
                                   'cancelled')),
    actor        TEXT    NOT NULL,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    updated_at   REAL    NOT NULL
);
CREATE INDEX deployments_status ON deployments (status);

CREATE TABLE deployment_targets (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    agent_id      INTEGER NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,              -- rollout order
    command_uid   TEXT    NOT NULL UNIQUE,       -- reserved at creation: the agent-side id
    command_id    INTEGER REFERENCES agent_commands (id) ON DELETE SET NULL,
    status        TEXT    NOT NULL
                  CHECK (status IN ('pending', 'transferring', 'running', 'success',
                                    'failed', 'cancelled', 'skipped')),
    changed       INTEGER,
    ok            INTEGER,
    failed        INTEGER,
    reason        TEXT,
    bytes_sent    INTEGER NOT NULL DEFAULT 0,
    post_check    TEXT,                          -- JSON: the service as checked after success
    started_at    REAL,
    finished_at   REAL,
    PRIMARY KEY (deployment_id, agent_id)
);
CREATE INDEX deployment_targets_command ON deployment_targets (command_id);

CREATE TABLE agent_services (
    agent_id          INTEGER NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    service           TEXT    NOT NULL,
    installed_version TEXT,
    active_version    TEXT,
    active            INTEGER NOT NULL DEFAULT 0,
    unit_state        TEXT,
    config_sha256     TEXT,
    details           TEXT,                      -- JSON: check_service.py's object
    checked_at        REAL    NOT NULL,
    PRIMARY KEY (agent_id, service)
);
