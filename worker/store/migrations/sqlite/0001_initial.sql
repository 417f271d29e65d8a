-- Codes: the latest code of each scope. Only its HMAC and its Fernet-sealed form are kept.
CREATE TABLE codes (
    scope_key   TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    client      TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    code_id     TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    digest      BLOB NOT NULL,
    sealed      TEXT NOT NULL,
    issued_at   REAL NOT NULL,
    expires_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL,
    state       TEXT NOT NULL
);
CREATE INDEX codes_expires_at ON codes (expires_at);

-- Processed commands: the idempotency table, holding each command's reply (never a plaintext code).
CREATE TABLE replies (
    kind        TEXT NOT NULL,
    command_id  TEXT NOT NULL,
    reply       BLOB NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (kind, command_id)
) WITHOUT ROWID;
CREATE INDEX replies_created_at ON replies (created_at);

-- Sends inside the rate-limit window; destinations are keyed pseudonyms, not addresses.
CREATE TABLE sends (
    id              INTEGER PRIMARY KEY,
    scope_key       TEXT NOT NULL,
    destination_key TEXT,
    sent_at         REAL NOT NULL
);
CREATE INDEX sends_scope ON sends (scope_key, sent_at);
CREATE INDEX sends_destination ON sends (destination_key, sent_at);
CREATE INDEX sends_sent_at ON sends (sent_at);

-- Consecutive failed confirmations per user.
CREATE TABLE streaks (
    user             TEXT PRIMARY KEY,
    count            INTEGER NOT NULL,
    last_failure_at  REAL NOT NULL
);
CREATE INDEX streaks_last_failure_at ON streaks (last_failure_at);

-- Transactional outbox: events staged with the state change, relayed after commit.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    type         TEXT NOT NULL,
    body         BLOB NOT NULL,
    created_at   REAL NOT NULL,
    lease_until  REAL NOT NULL
);
CREATE INDEX outbox_lease_until ON outbox (lease_until);
