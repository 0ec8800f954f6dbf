"""Local files. Before: the state directory, `ledger.sqlite` and `datasets/*/heldout.jsonl` were 0644
in 0755 folders, so any local user could read the held-out split. Now a process that owns a state
directory makes it 0700 and everything in it owner-only (an older directory is tightened at start),
and creates its files 0600 from then on."""
import stat

from valhelpers import ledger_rows


def test_the_validator_state_is_readable_by_its_owner_only(live, tmp_path):
    old = tmp_path / "v0" / "state"  # a state directory as an older version left it
    old.mkdir(parents=True, mode=0o755)
    (old / "notes.txt").write_text("operator notes")
    (old / "notes.txt").chmod(0o644)
    v = live()
    assert v.state == old
    assert ledger_rows(v.state, "SELECT COUNT(*) AS n FROM datasets")[0]["n"] == 2
    paths = [v.state, v.state / "ledger.sqlite", v.state / "notes.txt", *v.state.glob("datasets/*/heldout.jsonl"),
             *v.state.glob("checkpoints/v0/*")]
    assert len(paths) > 5
    loose = {str(p.relative_to(v.state.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
             if p.stat().st_mode & 0o077}
    assert not loose, loose
    assert stat.S_IMODE(v.state.stat().st_mode) == 0o700
