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

Relocatable: checkpoint paths are stored relative to the journal's directory (the state dir),
so a copied state dir (`cp -a A B`) uses and prunes only its own checkpoints. Rows written by
older versions hold absolute paths; those are read by their `checkpoints/...` tail, re-rooted
at this state dir, never at the directory they name.

Storage failures (a full disk, an I/O error, a read-only file) raise `JournalStorageError`
naming SQLite's own reason; a failed transaction is rolled back only if SQLite has not already
done so, so the reason is never hidden behind "cannot rollback - no transaction is active".
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

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


class JournalStorageError(RuntimeError):
    """The journal could not be written or read: `full` when the disk (or database) is full."""

    def __init__(self, message: str, *, full: bool) -> None:
        super().__init__(message)
        self.full = full


_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN = 13, 10, 8, 14


def storage_error(exc: sqlite3.Error, path: Path) -> JournalStorageError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    full = code == _SQLITE_FULL or "full" in str(exc)
    return JournalStorageError(f"the training journal {path} cannot be written: {exc}", full=full)


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.root.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._db().executescript(_SCHEMA)

    @contextmanager
    def _tx(self):
        """One write transaction; a storage failure becomes JournalStorageError."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:      # SQLite rolls back by itself on some errors (SQLITE_FULL)
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.OperationalError):
                raise storage_error(exc, self.path) from exc
            raise

    # ------------------------------------------------------------------ paths
    def relative(self, path: str | Path) -> str:
        """How a checkpoint path is stored: relative to the state dir when inside it."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, stored: str) -> Path:
        """A stored checkpoint path on this state dir. An absolute one (older journals) is
        re-rooted here by its tail from `checkpoints/` on, whatever directory it names."""
        p = PurePath(stored)
        if not p.is_absolute():
            return self.root / p
        parts = p.parts
        if "checkpoints" in parts:
            return self.root.joinpath(*parts[len(parts) - 1 - parts[::-1].index("checkpoints"):])
        return Path(p)

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
        now, out = time.time(), []
        with self._tx() as db:
            for payload, tokens in samples:
                cur = db.execute("INSERT INTO samples (payload, tokens, accepted_at, accepted_version, state)"
                                 " VALUES (?, ?, ?, ?, 'queued')", (json.dumps(payload), tokens, now, version))
                out.append(QueuedSample(int(cur.lastrowid), payload, now))
        return out

    def mark_applied(self, sample_ids: list[int], node: int, version: int) -> None:
        now = time.time()
        with self._tx() as db:
            for sid in sample_ids:
                cur = db.execute("UPDATE samples SET state='applied', node=?, version=?, applied_at=? "
                                 "WHERE id=? AND state='queued'", (node, version, now, sid))
                if cur.rowcount != 1:
                    raise RuntimeError(f"sample {sid} applied twice or never journaled")
                db.execute("INSERT INTO applications (sample_id, node, version, applied_at) VALUES (?, ?, ?, ?)",
                           (sid, node, version, now))

    def add_checkpoint(self, node: int, version: int, path: str | Path) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                       (node, version, self.relative(path), time.time()))

    def drop_checkpoint(self, node: int, version: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE node=? AND version=?", (node, version))

    def roll_back(self, node: int, after_version: int) -> int:
        """Applications on `node` newer than its restored checkpoint died with the process:
        queue those samples again. Returns how many."""
        with self._tx() as db:
            db.execute("UPDATE applications SET rolled_back=1 WHERE node=? AND version>? AND rolled_back=0",
                       (node, after_version))
            cur = db.execute("UPDATE samples SET state='queued', node=NULL, version=NULL, applied_at=NULL "
                             "WHERE state='applied' AND node=? AND version>?", (node, after_version))
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

    def latest_checkpoints(self) -> dict[int, tuple[int, Path]]:
        """node -> (version, path) of its newest recorded checkpoint."""
        rows = self._db().execute("SELECT node, MAX(version), path FROM checkpoints GROUP BY node").fetchall()
        return {n: (v, self.resolve(p)) for n, v, p in rows}

    def checkpoints(self, node: int) -> list[tuple[int, Path]]:
        """(version, path) of `node`'s recorded checkpoints, oldest first."""
        rows = self._db().execute("SELECT version, path FROM checkpoints WHERE node=? ORDER BY version",
                                  (node,)).fetchall()
        return [(v, self.resolve(p)) for v, p in rows]

    def is_empty(self) -> bool:
        """No sample and no checkpoint recorded (a new journal, or a 0-byte file)."""
        db = self._db()
        return (db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
                and db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 0)

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
