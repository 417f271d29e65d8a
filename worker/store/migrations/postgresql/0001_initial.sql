-- Codes: the latest code of each scope. Only its HMAC and its Fernet-sealed form are kept.
CREATE TABLE codes (
    scope_key   TEXT PRIMARY KEY,
    user_name   TEXT NOT NULL,
    client      TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    code_id     TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    digest      BYTEA NOT NULL,
    sealed      TEXT NOT NULL,
    issued_at   TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    attempts    INTEGER NOT NULL,
    state       TEXT NOT NULL
);
CREATE INDEX codes_expires_at ON codes (expires_at);

-- Processed commands: the idempotency table, holding each command's reply (never a plaintext code).
CREATE TABLE replies (
    kind        TEXT NOT NULL,
    command_id  TEXT NOT NULL,
    reply       BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kind, command_id)
);
CREATE INDEX replies_created_at ON replies (created_at);

-- Sends inside the rate-limit window; destinations are keyed pseudonyms, not addresses.
CREATE TABLE sends (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope_key       TEXT NOT NULL,
    destination_key TEXT,
    sent_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX sends_scope ON sends (scope_key, sent_at);
CREATE INDEX sends_destination ON sends (destination_key, sent_at);
CREATE INDEX sends_sent_at ON sends (sent_at);

-- Consecutive failed confirmations per user.
CREATE TABLE streaks (
    user_name        TEXT PRIMARY KEY,
    count            INTEGER NOT NULL,
    last_failure_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX streaks_last_failure_at ON streaks (last_failure_at);

-- Transactional outbox: events staged with the state change, relayed after commit.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    type         TEXT NOT NULL,
    body         BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL
);
CREATE INDEX outbox_lease_until ON outbox (lease_until);
