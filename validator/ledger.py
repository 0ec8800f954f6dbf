"""The validator's durable state: one SQLite database in WAL mode (schema in docs/validator.md).

Every state change that must survive kill -9 is one transaction here; files it refers to (spooled
payloads, checkpoints, momentum tensors) are written and fsynced first, so a row never points at a
half-written file. Rows are plain dataclasses; SQL stays in this module.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Iterator

from expertmesh.protocol.experts import ExpertSet

SCHEMA_VERSION = 4  # 2: verdicts.code (was the prefix of reason); 3: verdicts.sign_z, cross (general_* unused);
# 4: commits, submissions.commit_seq, verdicts.copy_z
STATES = ("open", "scoring", "merging", "published", "empty")
VERDICTS = ("accepted", "zero", "rejected")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN {STATES}),
  opened_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL, closed_ms INTEGER, finished_ms INTEGER,
  published_version INTEGER, eval_spec TEXT);
CREATE TABLE IF NOT EXISTS submissions (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, digest TEXT NOT NULL UNIQUE,
  round INTEGER NOT NULL REFERENCES rounds(round), miner TEXT NOT NULL, domain TEXT NOT NULL,
  model_version INTEGER NOT NULL, payload_sha256 TEXT NOT NULL, payload_bytes INTEGER NOT NULL,
  path TEXT NOT NULL, codec TEXT NOT NULL, token_count INTEGER NOT NULL, experts TEXT NOT NULL,
  received_ms INTEGER NOT NULL, commit_seq INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS submissions_payload ON submissions (round, miner, payload_sha256);
CREATE TABLE IF NOT EXISTS verdicts (
  digest TEXT PRIMARY KEY REFERENCES submissions(digest), round INTEGER NOT NULL,
  verdict TEXT NOT NULL CHECK (verdict IN {VERDICTS}), code TEXT NOT NULL, reason TEXT NOT NULL, score REAL NOT NULL,
  base_loss REAL, new_loss REAL, sign_z REAL, cross TEXT, max_cosine REAL, copy_of TEXT,
  update_ratio REAL, delta_norm REAL, eval_tokens INTEGER, weight REAL, seconds REAL, scored_ms INTEGER NOT NULL,
  copy_z REAL);
CREATE TABLE IF NOT EXISTS commits (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, miner TEXT NOT NULL, commitment TEXT NOT NULL,
  digest TEXT NOT NULL, received_ms INTEGER NOT NULL, UNIQUE (round, miner, commitment));
CREATE TABLE IF NOT EXISTS versions (
  version INTEGER PRIMARY KEY, parent INTEGER, round INTEGER, dir TEXT NOT NULL,
  manifest_sha256 TEXT NOT NULL, published_ms INTEGER NOT NULL, pruned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS momentum (
  layer INTEGER NOT NULL, expert INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
  round INTEGER NOT NULL, PRIMARY KEY (layer, expert));
CREATE TABLE IF NOT EXISTS datasets (
  dataset_id TEXT PRIMARY KEY, domain TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
  records INTEGER NOT NULL, duplicates INTEGER NOT NULL, train_records INTEGER NOT NULL,
  heldout_records INTEGER NOT NULL, train_path TEXT NOT NULL, heldout_path TEXT NOT NULL,
  train_sha256 TEXT NOT NULL, train_bytes INTEGER NOT NULL, registered_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dataset_uploads (
  digest TEXT PRIMARY KEY, dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id), received_ms INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class RoundRow:
    round: int
    base_version: int
    state: str
    opened_ms: int
    deadline_ms: int
    closed_ms: int | None = None
    finished_ms: int | None = None
    published_version: int | None = None
    eval_spec: str | None = None  # JSON {domain: [dataset ids]} frozen when the round opens (validator/evalset.py)


@dataclass(frozen=True)
class SubmissionRow:
    seq: int | None  # arrival order, assigned by the database
    digest: str
    round: int
    miner: str
    domain: str
    model_version: int
    payload_sha256: str
    payload_bytes: int
    path: str  # relative to the state directory
    codec: str
    token_count: int
    experts: ExpertSet  # stored as its JSON object
    received_ms: int
    commit_seq: int | None = None  # its commitment's place in the commit order (protocol.commit); None before schema 4

    def to_db(self) -> tuple:
        return tuple(json.dumps(self.experts.to_esft(), sort_keys=True) if f.name == "experts" else getattr(self, f.name)
                     for f in fields(self))

    @classmethod
    def from_db(cls, *values) -> SubmissionRow:
        return cls(*(ExpertSet.from_json(json.loads(v)) if f.name == "experts" else v for f, v in zip(fields(cls), values)))


@dataclass(frozen=True)
class VerdictRow:
    digest: str
    round: int
    verdict: str
    code: str  # why, for machines: ok, format, copy, general_guard, no_gain, ... (validator/judging.py)
    reason: str  # why, for people: the code and its figures
    score: float
    base_loss: float | None = None
    new_loss: float | None = None
    sign_z: float | None = None  # the noise rule's statistic (validator/scoring.py)
    cross: dict[str, list[float]] | None = None  # every scored domain: [loss before, after]; stored as JSON
    max_cosine: float | None = None
    copy_of: str | None = None
    update_ratio: float | None = None
    delta_norm: float | None = None
    eval_tokens: int | None = None
    weight: float | None = None
    seconds: float | None = None
    scored_ms: int = 0
    copy_z: float | None = None  # the copy rule's statistic: z of what is left after earlier deltas (validator/scoring.py)

    def to_db(self) -> tuple:
        return tuple(json.dumps(self.cross, sort_keys=True) if f.name == "cross" and self.cross is not None
                     else getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_db(cls, *values) -> VerdictRow:
        return cls(*(json.loads(v) if f.name == "cross" and v is not None else v for f, v in zip(fields(cls), values)))


@dataclass(frozen=True)
class VersionRow:
    version: int
    parent: int | None
    round: int | None
    dir: str
    manifest_sha256: str
    published_ms: int
    pruned: int = 0


@dataclass(frozen=True)
class DatasetRow:
    dataset_id: str
    domain: str
    name: str
    owner: str
    records: int
    duplicates: int
    train_records: int
    heldout_records: int
    train_path: str
    heldout_path: str
    train_sha256: str
    train_bytes: int
    registered_ms: int


def _columns(cls) -> str:
    return ", ".join(f.name for f in fields(cls))


def _insert(cls, table: str, skip: tuple[str, ...] = ()) -> str:
    names = [f.name for f in fields(cls) if f.name not in skip]
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


class Ledger:
    """One connection shared by the daemon's threads behind a lock (SQLite serialises writers anyway)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed round survives power loss, not just kill -9
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._create()
        except BaseException:
            self._db.close()
            raise

    def _create(self) -> None:
        with self.transaction() as db:
            for statement in SCHEMA.split(";"):  # executescript would commit the open transaction
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) in range(1, SCHEMA_VERSION):
                self._upgrade(db, int(row[0]))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ValueError(f"{self.path}: ledger schema {row[0]} is not {SCHEMA_VERSION}; "
                                 "use a fresh state_dir or a matching expertmesh version")

    @staticmethod
    def _upgrade(db: sqlite3.Connection, version: int) -> None:
        """An older ledger, brought up to SCHEMA_VERSION in place (new tables: already made by SCHEMA)."""
        if version == 1:  # the code was the reason's prefix up to ':'
            db.execute("ALTER TABLE verdicts ADD COLUMN code TEXT NOT NULL DEFAULT ''")
            db.execute("UPDATE verdicts SET code = CASE WHEN instr(reason, ':') > 0 "
                       "THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END")
        if version <= 2:
            db.execute("ALTER TABLE verdicts ADD COLUMN sign_z REAL")  # the general mix's columns stay, unused
            db.execute("ALTER TABLE verdicts ADD COLUMN cross TEXT")
        if version <= 3:
            db.execute("ALTER TABLE submissions ADD COLUMN commit_seq INTEGER")
            db.execute("ALTER TABLE verdicts ADD COLUMN copy_z REAL")
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, cls, sql: str, args: tuple = ()) -> list:
        with self._lock:
            make = getattr(cls, "from_db", cls)
            return [make(*r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, cls, sql: str, args: tuple = ()):
        rows = self._all(cls, sql, args)
        return rows[0] if rows else None

    # --- rounds --------------------------------------------------------------------------------
    def current_round(self) -> RoundRow | None:
        return self._one(RoundRow, f"SELECT {_columns(RoundRow)} FROM rounds ORDER BY round DESC LIMIT 1")

    def round(self, number: int) -> RoundRow | None:
        return self._one(RoundRow, f"SELECT {_columns(RoundRow)} FROM rounds WHERE round=?", (number,))

    def rounds(self) -> list[RoundRow]:
        return self._all(RoundRow, f"SELECT {_columns(RoundRow)} FROM rounds ORDER BY round")

    def open_round(self, db: sqlite3.Connection, number: int, base_version: int, opened_ms: int, deadline_ms: int,
                   eval_spec: str) -> None:
        db.execute("INSERT INTO rounds (round, base_version, state, opened_ms, deadline_ms, eval_spec) "
                   "VALUES (?, ?, 'open', ?, ?, ?)", (number, base_version, opened_ms, deadline_ms, eval_spec))

    def move_round(self, db: sqlite3.Connection, number: int, src: str, dst: str, **values) -> None:
        """Compare-and-set a round's state; an unexpected current state is a bug, not user input."""
        sets = ", ".join(["state=?"] + [f"{k}=?" for k in values])
        cur = db.execute(f"UPDATE rounds SET {sets} WHERE round=? AND state=?", (dst, *values.values(), number, src))
        assert cur.rowcount == 1, f"round {number} is not {src!r}"

    def extend_deadline(self, number: int, deadline_ms: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE rounds SET deadline_ms=? WHERE round=? AND state='open'", (deadline_ms, number))

    # --- submissions ---------------------------------------------------------------------------
    def add_submission(self, db: sqlite3.Connection, row: SubmissionRow) -> None:
        db.execute(_insert(SubmissionRow, "submissions", skip=("seq",)), row.to_db()[1:])

    def submission(self, digest: str) -> SubmissionRow | None:
        return self._one(SubmissionRow, f"SELECT {_columns(SubmissionRow)} FROM submissions WHERE digest=?", (digest,))

    def same_payload(self, number: int, miner: str, payload_sha256: str) -> SubmissionRow | None:
        return self._one(SubmissionRow, f"SELECT {_columns(SubmissionRow)} FROM submissions "
                         "WHERE round=? AND miner=? AND payload_sha256=?", (number, miner, payload_sha256))

    def submissions(self, number: int) -> list[SubmissionRow]:
        return self._all(SubmissionRow, f"SELECT {_columns(SubmissionRow)} FROM submissions WHERE round=? ORDER BY seq",
                         (number,))

    def count_submissions(self, db: sqlite3.Connection, number: int, miner: str | None = None) -> int:
        if miner is None:
            return db.execute("SELECT COUNT(*) FROM submissions WHERE round=?", (number,)).fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM submissions WHERE round=? AND miner=?", (number, miner)).fetchone()[0]

    # --- commitments (protocol.commit) ---------------------------------------------------------
    def add_commit(self, number: int, miner: str, commitment: str, digest: str, received_ms: int, limit: int
                   ) -> tuple[int, str] | None:
        """(seq, digest) of the commitment: the first one's for a known commitment; None when `miner` already
        holds `limit` others in this round."""
        with self.transaction() as db:
            known = db.execute("SELECT seq, digest FROM commits WHERE round=? AND miner=? AND commitment=?",
                               (number, miner, commitment)).fetchone()
            if known is not None:
                return tuple(known)
            n = db.execute("SELECT COUNT(*) FROM commits WHERE round=? AND miner=?", (number, miner)).fetchone()[0]
            if n >= limit:
                return None
            cur = db.execute("INSERT INTO commits (round, miner, commitment, digest, received_ms) VALUES (?, ?, ?, ?, ?)",
                             (number, miner, commitment, digest, received_ms))
            return cur.lastrowid, digest

    def commit_seq(self, number: int, miner: str, commitment: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT seq FROM commits WHERE round=? AND miner=? AND commitment=?",
                                   (number, miner, commitment)).fetchone()
        return row[0] if row else None

    def accepted_count(self, miner: str) -> int:
        """Submissions of `miner` merged into published versions: its standing (docs/SECURITY.md "Identity")."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM verdicts v JOIN submissions s ON s.digest=v.digest JOIN rounds r "
                "ON r.round=v.round WHERE s.miner=? AND v.verdict='accepted' AND r.state='published'",
                (miner,)).fetchone()[0]

    def spool_paths(self) -> set[str]:
        """Payloads still needed: those of rounds not finished (a finished round's are dropped with it)."""
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT s.path FROM submissions s JOIN rounds r ON r.round = s.round "
                "WHERE r.state NOT IN ('published', 'empty')")}

    # --- verdicts ------------------------------------------------------------------------------
    def add_verdict(self, row: VerdictRow) -> None:
        with self.transaction() as db:
            db.execute(_insert(VerdictRow, "verdicts"), row.to_db())

    def verdicts(self, number: int) -> dict[str, VerdictRow]:
        rows = self._all(VerdictRow, f"SELECT {_columns(VerdictRow)} FROM verdicts WHERE round=?", (number,))
        return {v.digest: v for v in rows}

    def leaderboard(self) -> list[tuple[str, int, float]]:
        """(miner, accepted count, total score) over submissions merged into published versions."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT s.miner, COUNT(*), SUM(v.score) FROM verdicts v JOIN submissions s ON s.digest=v.digest "
                "JOIN rounds r ON r.round=v.round WHERE v.verdict='accepted' AND r.state='published' "
                "GROUP BY s.miner ORDER BY SUM(v.score) DESC, s.miner")]

    # --- versions and momentum -----------------------------------------------------------------
    def add_version(self, db: sqlite3.Connection, row: VersionRow) -> None:
        db.execute(_insert(VersionRow, "versions"), astuple(row))

    def latest_version(self) -> VersionRow | None:
        return self._one(VersionRow, f"SELECT {_columns(VersionRow)} FROM versions ORDER BY version DESC LIMIT 1")

    def version(self, number: int) -> VersionRow | None:
        return self._one(VersionRow, f"SELECT {_columns(VersionRow)} FROM versions WHERE version=?", (number,))

    def versions(self) -> list[VersionRow]:
        return self._all(VersionRow, f"SELECT {_columns(VersionRow)} FROM versions ORDER BY version")

    def mark_pruned(self, number: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE versions SET pruned=1 WHERE version=?", (number,))

    def momentum_refs(self) -> dict[tuple[int, int], tuple[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT layer, expert, path, sha256 FROM momentum").fetchall()
        return {(l, e): (p, s) for l, e, p, s in rows}

    def set_momentum(self, db: sqlite3.Connection, refs: dict[tuple[int, int], tuple[str, str]], number: int) -> None:
        db.executemany("INSERT OR REPLACE INTO momentum VALUES (?, ?, ?, ?, ?)",
                       [(l, e, p, s, number) for (l, e), (p, s) in sorted(refs.items())])

    # --- datasets ------------------------------------------------------------------------------
    def add_dataset(self, row: DatasetRow) -> None:
        with self.transaction() as db:
            db.execute(_insert(DatasetRow, "datasets"), astuple(row))

    def add_dataset_upload(self, digest: str, dataset_id: str, received_ms: int) -> None:
        """Which dataset a signed upload registered, so the same upload again gets the same answer."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO dataset_uploads VALUES (?, ?, ?)", (digest, dataset_id, received_ms))

    def dataset_of_upload(self, digest: str) -> DatasetRow | None:
        return self._one(DatasetRow, f"SELECT {_columns(DatasetRow)} FROM datasets WHERE dataset_id="
                         "(SELECT dataset_id FROM dataset_uploads WHERE digest=?)", (digest,))

    def dataset(self, dataset_id: str) -> DatasetRow | None:
        return self._one(DatasetRow, f"SELECT {_columns(DatasetRow)} FROM datasets WHERE dataset_id=?", (dataset_id,))

    def datasets(self, domain: str | None = None, before_ms: int | None = None) -> list[DatasetRow]:
        sql, args = f"SELECT {_columns(DatasetRow)} FROM datasets WHERE 1=1", []
        if domain is not None:
            sql, args = sql + " AND domain=?", args + [domain]
        if before_ms is not None:
            sql, args = sql + " AND registered_ms<=?", args + [before_ms]
        return self._all(DatasetRow, sql + " ORDER BY registered_ms, dataset_id", tuple(args))

