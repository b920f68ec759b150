-- Bearer tokens for `--auth required`. Only a hash of each secret is kept
-- (SHA-256 of a 32-byte random secret: a hash for lookup, not a password
-- hash, since the secret has full entropy).
CREATE TABLE api_token (
    id          uuid        PRIMARY KEY,
    secret_hash bytea       NOT NULL UNIQUE,
    role        text        NOT NULL CHECK (role IN ('worker', 'producer', 'admin')),
    task_types  text[]      NOT NULL DEFAULT '{}',
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
