"""The round state machine on a real SQLite ledger: transitions, intake limits, atomicity, persistence."""
import json

import pytest

from expertmesh.protocol.experts import ExpertSet
from expertmesh.validator.config import RoundsSection
from expertmesh.validator.ledger import Ledger, SubmissionRow, VerdictRow, VersionRow
from expertmesh.validator.rounds import IntakeRefused, RoundBook


class Clock:
    def __init__(self, t: int = 1_000_000):
        self.t = t

    def __call__(self) -> int:
        return self.t


def sub(n: int, miner: str = "m1", round_number: int = 1) -> SubmissionRow:
    return SubmissionRow(seq=None, digest=f"{n:064x}", round=round_number, miner=miner, domain="math", model_version=0,
                         payload_sha256=f"{n + 1000:064x}", payload_bytes=10, path=f"r{round_number}/{n}.delta",
                         codec="int8", token_count=100, experts=ExpertSet([(0, 1)]), received_ms=0)


@pytest.fixture
def book(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with ledger.transaction() as db:
        ledger.add_version(db, VersionRow(0, None, None, "v0", "ab" * 32, 0))
    clock = Clock()
    b = RoundBook(ledger, RoundsSection(duration_s=10, min_submissions=2, max_submissions=3, max_per_miner=1),
                  lambda t: {"math": ["math-0"]}, clock)
    b.open_first(0)
    yield b
    ledger.close()


def test_deadline_with_too_few_moves_on_then_closes(book):
    row = book.current()
    assert (row.round, row.state, row.base_version) == (1, "open", 0)
    book.record(sub(1, "a"))
    book.clock.t += 10_000
    row = book.tick(row)
    assert row.state == "open" and row.deadline_ms == book.clock.t + 10_000, "one submission < min 2: keep waiting"
    book.record(sub(2, "b"))
    assert book.tick(row).state == "open", "before the new deadline nothing happens"
    book.clock.t = row.deadline_ms
    assert book.tick(row).state == "scoring"


def test_max_submissions_closes_early_and_refuses_more(book):
    for n, m in enumerate("abc"):
        book.record(sub(n, m))
    with pytest.raises(IntakeRefused, match="full") as exc:
        book.record(sub(9, "d"))
    assert exc.value.status == "RESOURCE_EXHAUSTED"
    assert book.tick(book.current()).state == "scoring"
    with pytest.raises(IntakeRefused, match="not open") as exc:
        book.record(sub(10, "e"))
    assert exc.value.status == "FAILED_PRECONDITION"


def test_one_submission_per_miner_and_digest_unique(book):
    book.record(sub(1, "a"))
    with pytest.raises(IntakeRefused, match="already made 1") as exc:
        book.record(sub(2, "a"))
    assert exc.value.status == "ALREADY_EXISTS"
    assert len(book.ledger.submissions(1)) == 1


def test_empty_round_reopens_on_the_same_version(book):
    for n, m in enumerate("ab"):
        book.record(sub(n, m))
    book.clock.t += 10_000
    row = book.tick(book.current())
    nxt = book.finish_empty(row)
    assert (nxt.round, nxt.state, nxt.base_version) == (2, "open", 0)
    assert book.ledger.round(1).state == "empty" and book.ledger.latest_version().version == 0


def test_publish_is_all_or_nothing_and_persists(book, tmp_path):
    for n, m in enumerate("abc"):
        book.record(sub(n, m))
    row = book.to_merging(book.tick(book.current()))
    bad = VersionRow(0, None, 1, "v1", "cd" * 32, 5)  # version 0 exists: the insert fails inside the transaction
    with pytest.raises(Exception, match="UNIQUE"):
        book.finish_published(row, bad, {(0, 1): ("momentum/r1/0.1.safetensors", "ef" * 32)})
    assert book.ledger.round(1).state == "merging" and book.ledger.momentum_refs() == {}
    assert book.ledger.current_round().round == 1, "no next round was opened"

    book.ledger.add_verdict(VerdictRow(f"{0:064x}", 1, "accepted", "ok", "ok", 0.5, scored_ms=1))
    good = VersionRow(1, 0, 1, "v1", "cd" * 32, 5)
    book.finish_published(row, good, {(0, 1): ("momentum/r1/0.1.safetensors", "ef" * 32)})
    book.ledger.close()
    again = Ledger(tmp_path / "ledger.sqlite")  # what a restarted daemon sees
    assert again.round(1).state == "published" and again.round(1).published_version == 1
    assert again.current_round().round == 2 and again.current_round().base_version == 1
    assert again.momentum_refs() == {(0, 1): ("momentum/r1/0.1.safetensors", "ef" * 32)}
    assert again.leaderboard() == [("a", 1, 0.5)]
    again.close()


def test_a_newer_schema_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    with ledger.transaction() as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    ledger.close()
    with pytest.raises(ValueError, match="schema 99"):
        Ledger(tmp_path / "l.sqlite")


def test_a_schema_1_ledger_gets_its_verdict_codes_from_the_reasons(book, tmp_path):
    for n, m in enumerate("ab"):
        book.record(sub(n, m))
    for n, reason in enumerate(["copy: cosine 0.9990 > 0.98 with submission 00", "ok"]):
        book.ledger.add_verdict(VerdictRow(f"{n:064x}", 1, "rejected" if n == 0 else "accepted", "x", reason, 0.0))
    with book.ledger.transaction() as db:  # what schema 1 stored: the code only as the reason's prefix
        for column in ("code", "sign_z", "cross", "copy_z"):
            db.execute(f"ALTER TABLE verdicts DROP COLUMN {column}")
        db.execute("ALTER TABLE submissions DROP COLUMN commit_seq")
        db.execute("DROP TABLE commits")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    book.ledger.close()
    again = Ledger(tmp_path / "ledger.sqlite")
    assert {v.digest[-1]: v.code for v in again.verdicts(1).values()} == {"0": "copy", "1": "ok"}
    assert [s.commit_seq for s in again.submissions(1)] == [None, None], "judged in arrival order, as before"
    assert again.add_commit(2, "a", "cd" * 32, "ef" * 32, 0, limit=1) == (1, "ef" * 32)
    again.close()


def test_a_round_without_submissions_gives_way_to_new_datasets_one_with_them_does_not(book):
    row = book.current()
    assert row.round == 1 and json.loads(row.eval_spec) == {"math": ["math-0"]}, "frozen when it opened"
    assert book.reopen_if_stale(row) == row, "nothing new registered: the round stays"
    book.spec = lambda t: {"math": ["math-0", "math-1"]}
    after = book.reopen_if_stale(row)
    assert (after.round, after.state, json.loads(after.eval_spec)) == (2, "open", {"math": ["math-0", "math-1"]})
    assert book.ledger.round(1).state == "empty" and book.ledger.round(1).eval_spec == row.eval_spec
    assert book.reopen_if_stale(row).round == 2, "a stale row (another thread moved on) changes nothing"
    book.record(sub(1, "a", round_number=2))
    book.spec = lambda t: {"math": ["math-0", "math-1"], "code": ["code-0"]}
    assert book.reopen_if_stale(book.current()).round == 2, "a round holding a submission keeps its spec"
