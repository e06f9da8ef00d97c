"""The SQLite schema as an append-only list of migrations, indexed by ``PRAGMA user_version``.

Never edit a migration that has shipped: append a new one.
"""

from daemon.states import InputState, JobState

_INPUT_STATES = ", ".join(f"'{s.value}'" for s in InputState)
_JOB_STATES = ", ".join(f"'{s.value}'" for s in JobState)

MIGRATIONS: list[list[str]] = [
    # 1: inputs, parts, jobs, history, media
    [
        f"""
        CREATE TABLE inputs (
            id            TEXT PRIMARY KEY,
            rel_path      TEXT NOT NULL,            -- relative to the inbox: 'a.jsonl', 'model/a.jsonl'
            model         TEXT NOT NULL,
            kind          TEXT NOT NULL DEFAULT 'generate' CHECK (kind IN ('generate', 'embed')),
            state         TEXT NOT NULL CHECK (state IN ({_INPUT_STATES})),
            reason        TEXT,                     -- one line: why it waits, or why it ended badly
            work_path     TEXT NOT NULL,            -- the claimed file, under state/work/
            size_bytes    INTEGER,
            sha256        TEXT,
            request_count INTEGER,
            est_tokens    INTEGER,
            fresh         INTEGER NOT NULL DEFAULT 0,   -- 1: never served from an earlier drop
            media_count   INTEGER NOT NULL DEFAULT 0,   -- parts referring to local media (file:NAME)
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            reused_from   TEXT,
            error         TEXT,                     -- JSON details for the error file
            summary       TEXT,                     -- JSON of the final summary
            results_path  TEXT,                     -- merged results kept for reuse, under state/
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            finished_at   REAL
        ) STRICT
        """,
        "CREATE INDEX inputs_state ON inputs(state)",
        "CREATE INDEX inputs_path ON inputs(rel_path, created_at)",
        "CREATE INDEX inputs_content ON inputs(model, sha256)",
        """
        CREATE TABLE parts (
            input_id      TEXT NOT NULL REFERENCES inputs(id) ON DELETE CASCADE,
            part_no       INTEGER NOT NULL,         -- 1-based
            first_line    INTEGER NOT NULL,         -- physical 1-based line numbers in the work file
            last_line     INTEGER NOT NULL,
            start_offset  INTEGER NOT NULL,         -- byte range in the work file
            end_offset    INTEGER NOT NULL,
            request_count INTEGER NOT NULL,
            size_bytes    INTEGER NOT NULL,
            est_tokens    INTEGER NOT NULL,
            PRIMARY KEY (input_id, part_no)
        ) STRICT
        """,
        f"""
        CREATE TABLE jobs (
            id             INTEGER PRIMARY KEY,
            input_id       TEXT NOT NULL REFERENCES inputs(id) ON DELETE CASCADE,
            part_no        INTEGER NOT NULL,
            attempt        INTEGER NOT NULL,        -- 1 for the first job of a part, then 2, 3, ...
            display_name   TEXT NOT NULL UNIQUE,    -- gemini-batchd:<input>:<part>[:<attempt>]
            state          TEXT NOT NULL CHECK (state IN ({_JOB_STATES})),
            mode           TEXT NOT NULL CHECK (mode IN ('inline', 'file')),
            source_path    TEXT NOT NULL,           -- JSONL of {{"key","request"}} lines this job submits
            request_count  INTEGER NOT NULL,
            est_tokens     INTEGER NOT NULL,
            upload_name    TEXT,                    -- files/<id> of the uploaded source
            remote_name    TEXT UNIQUE,             -- batches/<id>
            remote_state   TEXT,                    -- BATCH_STATE_*
            result_file    TEXT,                    -- files/batch-<id>, for file jobs
            results_path   TEXT,                    -- local results JSONL once collected
            done_count     INTEGER NOT NULL DEFAULT 0,
            failed_count   INTEGER NOT NULL DEFAULT 0,
            pending_count  INTEGER NOT NULL DEFAULT 0,
            error          TEXT,                    -- JSON: the API's error for this job
            not_before     REAL NOT NULL DEFAULT 0, -- backoff: no API call for this job before
            poll_interval  REAL,
            next_poll_at   REAL,
            remote_create_time TEXT,
            remote_end_time    TEXT,
            created_at     REAL NOT NULL,
            updated_at     REAL NOT NULL,
            submitted_at   REAL,
            finished_at    REAL,
            UNIQUE (input_id, part_no, attempt)
        ) STRICT
        """,
        "CREATE INDEX jobs_state ON jobs(state)",
        "CREATE INDEX jobs_input ON jobs(input_id)",
        """
        CREATE TABLE history (
            id        INTEGER PRIMARY KEY,
            input_id  TEXT NOT NULL REFERENCES inputs(id) ON DELETE CASCADE,
            at        REAL NOT NULL,
            state     TEXT NOT NULL,
            note      TEXT
        ) STRICT
        """,
        "CREATE INDEX history_input ON history(input_id, id)",
        """
        CREATE TABLE media (
            sha256      TEXT PRIMARY KEY,
            file_name   TEXT NOT NULL,              -- files/<id>
            uri         TEXT NOT NULL,
            mime_type   TEXT,
            size_bytes  INTEGER NOT NULL,
            uploaded_at REAL NOT NULL,
            expires_at  REAL NOT NULL
        ) STRICT
        """,
    ],
    # 2: a job's source may be a byte range of its input's work file (canonical inputs are
    # submitted straight from it, without writing part files)
    [
        "ALTER TABLE jobs ADD COLUMN source_start INTEGER",  # NULL: the whole of source_path
        "ALTER TABLE jobs ADD COLUMN source_end INTEGER",
    ],
    # 3: which file each local media name of an input was when it was validated, so that the
    # upload sends that file and not one swapped in later (e.g. a link to a secret)
    [
        """
        CREATE TABLE input_media (
            input_id TEXT NOT NULL,
            name     TEXT NOT NULL,                -- the NAME of file:NAME
            dev      INTEGER NOT NULL,
            ino      INTEGER NOT NULL,
            size     INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            PRIMARY KEY (input_id, name)
        ) STRICT
        """,
    ],
    # 4: which API key created a job (a salted fingerprint, never the key), and the salt
    [
        "ALTER TABLE jobs ADD COLUMN key_fp TEXT",  # NULL: before this column existed
        """
        CREATE TABLE key_salt (
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            salt  BLOB NOT NULL                     -- random, per state folder
        ) STRICT
        """,
    ],
    # 5: jobs.error held two things: submission bookkeeping until a job is done, the API's error
    # after. The bookkeeping gets its own columns; rows written before keep being read right.
    [
        "ALTER TABLE jobs ADD COLUMN submit_retries INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN check_remote INTEGER",  # NULL: unknown (look before creating)
        "ALTER TABLE jobs ADD COLUMN submit_error TEXT",  # JSON: the last API error of a submit
        """
        UPDATE jobs SET submit_retries = COALESCE(json_extract(error, '$.retries'), 0),
            check_remote = json_extract(error, '$.check_remote'),
            submit_error = json_extract(error, '$.last'), error = NULL
        WHERE state IN ('planned', 'uploading', 'creating') AND json_valid(error)
            AND json_extract(error, '$.retries') IS NOT NULL
        """,
    ],
]
