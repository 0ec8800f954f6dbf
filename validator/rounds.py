"""The round state machine, persisted in the ledger: every transition is one transaction.

    OPEN ──deadline (≥ min submissions) or max reached──▶ SCORING ──all scored──▶ MERGING ──▶ PUBLISHED
      ▲                                                      │ nothing accepted                 │
      └──────────────── next round, same version ◀── EMPTY ◀─┘       next round, version v+1 ◀──┘

A round that reaches its deadline with fewer than min_submissions stays OPEN with a later deadline.
Finishing a round and opening the next happen in the same transaction, so after a crash there is
always exactly one current round, and its state says which step to redo.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from expertmesh.validator.config import RoundsSection
from expertmesh.validator.ledger import Ledger, RoundRow, SubmissionRow, VersionRow


class IntakeRefused(ValueError):
    """A submission this round cannot take; `status` is the gRPC status name the peer gets."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def now_ms() -> int:
    return int(time.time() * 1000)


class RoundBook:
    """`spec(t)` is the evaluation spec ({domain: dataset ids}) a round opened at t is frozen with."""

    def __init__(self, ledger: Ledger, cfg: RoundsSection, spec: Callable[[int], dict[str, list[str]]],
                 clock: Callable[[], int] = now_ms):
        self.ledger, self.cfg, self.spec, self.clock = ledger, cfg, spec, clock

    def _open(self, db, number: int, base_version: int, t: int) -> None:
        self.ledger.open_round(db, number, base_version, t, t + int(self.cfg.duration_s * 1000),
                               json.dumps(self.spec(t), sort_keys=True))

    def current(self) -> RoundRow:
        row = self.ledger.current_round()
        assert row is not None, "no round yet: call open_first after version 0 is published"
        return row

    def open_first(self, base_version: int) -> RoundRow:
        with self.ledger.transaction() as db:
            if self.ledger.current_round() is None:
                self._open(db, 1, base_version, self.clock())
        return self.current()

    def check_room(self, number: int, miner: str) -> None:
        """IntakeRefused unless round `number` is open with room for one more submission from `miner`.

        Asked before an upload's payload is read (so a key over its quota costs no disk) and again,
        atomically with the insert, by `record`.
        """
        with self.ledger.transaction() as db:
            self._check_room(db, number, miner)

    def _check_room(self, db, number: int, miner: str) -> None:
        cur = self.ledger.current_round()
        if cur.round != number or cur.state != "open":
            raise IntakeRefused("FAILED_PRECONDITION",
                                f"round {number} is not open (current round {cur.round} is {cur.state}); "
                                "ask GetRound and train on its model version")
        if self.cfg.max_submissions and self.ledger.count_submissions(db, cur.round) >= self.cfg.max_submissions:
            raise IntakeRefused("RESOURCE_EXHAUSTED", f"round {cur.round} is full "
                                f"({self.cfg.max_submissions} submissions); submit to the next round")
        if self.ledger.count_submissions(db, cur.round, miner) >= self.cfg.max_per_miner:
            raise IntakeRefused("ALREADY_EXISTS", f"this key already made {self.cfg.max_per_miner} submission(s) "
                                f"in round {cur.round}; wait for the next round")

    def record(self, row: SubmissionRow) -> None:
        """Add a submission to its round, atomically with the checks that the round may still take it."""
        with self.ledger.transaction() as db:
            self._check_room(db, row.round, row.miner)
            self.ledger.add_submission(db, row)

    def tick(self, row: RoundRow) -> RoundRow:
        """OPEN only: close when due, or move a passed deadline on when too few arrived."""
        assert row.state == "open", row
        t = self.clock()
        with self.ledger.transaction() as db:
            n = self.ledger.count_submissions(db, row.round)
        full = bool(self.cfg.max_submissions) and n >= self.cfg.max_submissions
        if full or (t >= row.deadline_ms and n >= self.cfg.min_submissions):
            with self.ledger.transaction() as db:
                self.ledger.move_round(db, row.round, "open", "scoring", closed_ms=t)
        elif t >= row.deadline_ms:
            self.ledger.extend_deadline(row.round, t + int(self.cfg.duration_s * 1000))
        return self.ledger.round(row.round)

    def reopen_if_stale(self, row: RoundRow) -> RoundRow:
        """OPEN only: a round that has taken no submission yet, and whose frozen spec is no longer what
        a round opened now would score (datasets registered since), ends empty; the next round opens
        with the new spec. The frozen spec itself is never edited, and once a round holds a
        submission its spec stays until it closes."""
        t = self.clock()
        if json.loads(row.eval_spec or "{}") == self.spec(t):
            return row
        with self.ledger.transaction() as db:  # decided again inside: another thread may have moved on
            cur = self.ledger.current_round()
            if (cur.round != row.round or cur.state != "open" or self.ledger.count_submissions(db, cur.round)
                    or json.loads(cur.eval_spec or "{}") == self.spec(t)):
                return self.current()
            self.ledger.move_round(db, cur.round, "open", "empty", closed_ms=t, finished_ms=t)
            self._open(db, cur.round + 1, cur.base_version, t)
        return self.current()

    def to_merging(self, row: RoundRow) -> RoundRow:
        with self.ledger.transaction() as db:
            self.ledger.move_round(db, row.round, "scoring", "merging")
        return self.ledger.round(row.round)

    def finish_empty(self, row: RoundRow) -> RoundRow:
        """Nothing accepted: publish nothing, reopen on the same version."""
        t = self.clock()
        with self.ledger.transaction() as db:
            self.ledger.move_round(db, row.round, "scoring", "empty", finished_ms=t)
            self._open(db, row.round + 1, row.base_version, t)
        return self.current()

    def finish_published(self, row: RoundRow, version: VersionRow, momentum: dict[tuple[int, int], tuple[str, str]]
                         ) -> RoundRow:
        """The published version, its momenta and the next round, all or nothing."""
        t = self.clock()
        with self.ledger.transaction() as db:
            self.ledger.add_version(db, version)
            self.ledger.set_momentum(db, momentum, row.round)
            self.ledger.move_round(db, row.round, "merging", "published", finished_ms=t,
                                   published_version=version.version)
            self._open(db, row.round + 1, version.version, t)
        return self.current()
