"""The durable journal of training samples (SQLite in WAL mode under --state-dir).

A sample is written here, and the transaction committed, before `POST /v1/train` answers; from
then on it is trained exactly once in the model that survives a crash:

    queued ──(an optimizer step of node n applied its micro-batch: version v)──► applied (n, v)
    applied (n, v) ──(restart from a checkpoint of node n older than v)──► queued again

The second arrow is what makes "exactly once" hold across a SIGKILL: an application that no
checkpoint captured died with the process, so it is rolled back (the `applications` row is
kept, marked rolled_back) and the sample is trained again. A checkpoint is recorded here only
after its files are on disk, and only after the samples it contains were marked applied.

Durability: `synchronous=FULL`. In WAL mode NORMAL would already survive a killed process (the
WAL is in the OS page cache), but not a power loss or kernel crash: commits since the last
checkpoint of the WAL could vanish after we answered "accepted". FULL fsyncs the WAL on every
commit; we commit once per POST (all its samples) and once per optimizer step, so the cost is
one fsync per request, not per sample.

Each thread gets its own connection (the HTTP handlers' worker threads write samples, the engine
thread marks them applied); SQLite serializes the writers.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,              -- the sample as received: {"text"} or {"prompt", "completion"}
    tokens INTEGER NOT NULL,            -- its length in tokens (after truncation)
    accepted_at REAL NOT NULL,          -- unix time of the commit
    accepted_version INTEGER NOT NULL,  -- the served weight version when it was accepted
    state TEXT NOT NULL CHECK (state IN ('queued', 'applied')),
    node INTEGER,                       -- applied: the node whose step applied it
    version INTEGER,                    -- applied: that node's weight version after the step
    applied_at REAL
);
CREATE INDEX IF NOT EXISTS samples_state ON samples (state);
CREATE TABLE IF NOT EXISTS applications (
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    node INTEGER NOT NULL,
    version INTEGER NOT NULL,
    applied_at REAL NOT NULL,
    rolled_back INTEGER NOT NULL DEFAULT 0   -- 1: lost in a crash before a checkpoint held it
);
CREATE TABLE IF NOT EXISTS checkpoints (
    node INTEGER NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (node, version)
);
"""


@dataclass(frozen=True)
class QueuedSample:
    sample_id: int
    payload: dict
    accepted_at: float


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ writes
    def add(self, samples: list[tuple[dict, int]], version: int) -> list[QueuedSample]:
        """Commit (payload, tokens) samples as queued, in one transaction; return them with ids."""
        db, now, out = self._db(), time.time(), []
        db.execute("BEGIN IMMEDIATE")
        try:
            for payload, tokens in samples:
                cur = db.execute("INSERT INTO samples (payload, tokens, accepted_at, accepted_version, state)"
                                 " VALUES (?, ?, ?, ?, 'queued')", (json.dumps(payload), tokens, now, version))
                out.append(QueuedSample(int(cur.lastrowid), payload, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def mark_applied(self, sample_ids: list[int], node: int, version: int) -> None:
        db, now = self._db(), time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sid in sample_ids:
                cur = db.execute("UPDATE samples SET state='applied', node=?, version=?, applied_at=? "
                                 "WHERE id=? AND state='queued'", (node, version, now, sid))
                if cur.rowcount != 1:
                    raise RuntimeError(f"sample {sid} applied twice or never journaled")
                db.execute("INSERT INTO applications (sample_id, node, version, applied_at) VALUES (?, ?, ?, ?)",
                           (sid, node, version, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def add_checkpoint(self, node: int, version: int, path: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                           (node, version, path, time.time()))

    def drop_checkpoint(self, node: int, version: int) -> None:
        self._db().execute("DELETE FROM checkpoints WHERE node=? AND version=?", (node, version))

    def roll_back(self, node: int, after_version: int) -> int:
        """Applications on `node` newer than its restored checkpoint died with the process:
        queue those samples again. Returns how many."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE applications SET rolled_back=1 WHERE node=? AND version>? AND rolled_back=0",
                       (node, after_version))
            cur = db.execute("UPDATE samples SET state='queued', node=NULL, version=NULL, applied_at=NULL "
                             "WHERE state='applied' AND node=? AND version>?", (node, after_version))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return cur.rowcount

    # ------------------------------------------------------------------ reads
    def queued(self) -> list[QueuedSample]:
        rows = self._db().execute("SELECT id, payload, accepted_at FROM samples WHERE state='queued' "
                                  "ORDER BY id").fetchall()
        return [QueuedSample(i, json.loads(p), t) for i, p, t in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) FROM samples GROUP BY state").fetchall()
        got = dict(rows)
        return {"queued": got.get("queued", 0), "applied": got.get("applied", 0)}

    def latest_checkpoints(self) -> dict[int, tuple[int, str]]:
        """node -> (version, path) of its newest recorded checkpoint."""
        rows = self._db().execute("SELECT node, MAX(version), path FROM checkpoints GROUP BY node").fetchall()
        return {n: (v, p) for n, v, p in rows}

    def checkpoints(self, node: int) -> list[tuple[int, str]]:
        return self._db().execute("SELECT version, path FROM checkpoints WHERE node=? ORDER BY version",
                                  (node,)).fetchall()

    def is_empty(self) -> bool:
        return self._db().execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0

    def lag(self, limit: int = 200) -> list[tuple[float, int, int]]:
        """(seconds from acceptance to application, accepted version, applied version) of the
        most recently applied samples."""
        return self._db().execute(
            "SELECT applied_at - accepted_at, accepted_version, version FROM samples "
            "WHERE state='applied' ORDER BY applied_at DESC LIMIT ?", (limit,)).fetchall()

    def audit(self) -> dict[str, int]:
        """Exactly-once check: samples, applied ones, and applied ones whose live (not rolled
        back) application count is not exactly one."""
        db = self._db()
        total = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        applied = db.execute("SELECT COUNT(*) FROM samples WHERE state='applied'").fetchone()[0]
        wrong = db.execute(
            "SELECT COUNT(*) FROM samples s WHERE (SELECT COUNT(*) FROM applications a WHERE "
            "a.sample_id = s.id AND a.rolled_back = 0) != (CASE s.state WHEN 'applied' THEN 1 ELSE 0 END)"
        ).fetchone()[0]
        return {"samples": total, "applied": applied, "not_exactly_once": wrong}
