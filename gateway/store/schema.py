"""The schema, as numbered migrations applied in order at start (``PRAGMA user_version``)."""

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE tenants (
        id INTEGER PRIMARY KEY,
        data TEXT NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant INTEGER NOT NULL,
        natural_key TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (tenant, natural_key)
    );
    CREATE TABLE calls (
        tenant INTEGER NOT NULL,
        key TEXT NOT NULL,
        final INTEGER NOT NULL,
        updated REAL NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    CREATE INDEX calls_open ON calls (final) WHERE final = 0;
    CREATE INDEX calls_recent ON calls (tenant, updated);
    CREATE TABLE actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant INTEGER NOT NULL,
        call TEXT NOT NULL,
        leg TEXT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL,
        created REAL NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        UNIQUE (tenant, call, key)
    );
    CREATE INDEX actions_state ON actions (state);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action INTEGER NOT NULL,
        at REAL NOT NULL,
        outcome TEXT NOT NULL,
        status INTEGER,
        request TEXT NOT NULL,
        answer TEXT NOT NULL
    );
    CREATE INDEX attempts_action ON attempts (action);
    CREATE TABLE cursors (
        name TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    """,
    # 2: a hangup drops the pending pop-up of its leg; without this index SQLite looked it
    # up through actions_state, reading every pending action (the whole backlog while a
    # CRM is slow) once per hangup.
    """
    CREATE INDEX actions_leg ON actions (tenant, call, leg);
    """,
    # 3: calls whose events could not be folded (kept with the error and their events until
    # an operator re-folds them), and the pauses CRM hosts asked for with Retry-After (so a
    # restart does not forget them).
    """
    CREATE TABLE quarantine (
        tenant INTEGER NOT NULL,
        key TEXT NOT NULL,
        at REAL NOT NULL,
        error TEXT NOT NULL,
        events TEXT NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    CREATE TABLE pauses (
        bucket TEXT PRIMARY KEY,
        until REAL NOT NULL
    );
    """,
    # 4: named credentials an operator creates once and several tenants pick by id (one CRM
    # login for several tenants), data being the JSON object of their fields, secrets
    # included; AUTOINCREMENT so that the id of a deleted credential is never given to a new
    # one (a tenant still naming it must not get another login).  And the tokens the gateway
    # obtains from PBX and CRM APIs (OAuth access and refresh), so a restart does not log in
    # again.
    """
    CREATE TABLE credentials (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (kind, name)
    );
    CREATE TABLE tokens (
        key TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 5: the probe of the key that seals secrets (gateway.seal): a value sealed with it, so a
    # store opened with another key, or none, refuses to start even before a secret is read.
    # Written (and the secrets stored in clear until then sealed) by the first start with a
    # key.
    """
    CREATE TABLE seal (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        probe TEXT NOT NULL
    );
    """,
]
