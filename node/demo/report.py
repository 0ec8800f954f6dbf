"""What the demo prints and writes after each published round: submissions, scores, held-out losses."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from expertmesh.protocol.types import RoundInfo


@dataclass(frozen=True)
class RoundReport:
    round: int
    version: int
    checkpoint: Path
    submissions: int
    accepted: int
    scores: dict[str, float | None]  # miner name -> score (None: submitted, not accepted; absent: no submission)
    domains: dict[str, str]  # miner name -> domain
    domain_loss: dict[str, float]
    seconds: float

    @classmethod
    def build(cls, checkpoint: Path, now: RoundInfo, miners: list[tuple[str, str, str, Path]],
              losses: dict[str, float], seconds: float) -> "RoundReport":
        """From the published manifest (accepted and their scores) and the miners' own submission records."""
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        published_round = manifest.get("round") or now.round - 1
        accepted = {a.get("miner"): a.get("score") for a in manifest.get("accepted", [])}
        scores, submitted = {}, 0
        for name, _, key_id, state in miners:
            book = state / "submissions.json"
            entry = json.loads(book.read_text()).get(str(published_round)) if book.is_file() else None
            if entry is not None and entry.get("outcome") == "received":
                submitted += 1
                scores[name] = accepted.get(key_id)
        return cls(published_round, manifest["version"], checkpoint, submitted, len(accepted), scores,
                   {name: domain for name, domain, _, _ in miners}, losses, round(seconds, 1))

    def to_json(self) -> dict:
        return {"round": self.round, "version": self.version, "checkpoint": str(self.checkpoint),
                "submissions": self.submissions, "accepted": self.accepted, "scores": self.scores,
                "domain_loss": self.domain_loss, "seconds": self.seconds}


def _pct(new: float, base: float) -> str:
    return f"{100 * (new - base) / base:+.2f}%"


def table(r: RoundReport, base: dict[str, float]) -> str:
    lines = [f"", f"round {r.round} -> version {r.version} ({r.seconds:.0f}s): "
             f"{r.submissions} submission(s), {r.accepted} accepted",
             f"  {'miner':<22} {'domain':<12} {'score':>9}"]
    for name, domain in r.domains.items():
        score = r.scores.get(name, "absent")
        shown = "no submission" if score == "absent" else "not accepted" if score is None else f"{score:.5f}"
        lines.append(f"  {name:<22} {domain:<12} {shown:>9}")
    lines.append(f"  {'held-out loss':<22} {'base':>8} {f'v{r.version}':>8} {'change':>8}")
    for domain, loss in r.domain_loss.items():
        lines.append(f"  {domain:<22} {base[domain]:>8.4f} {loss:>8.4f} {_pct(loss, base[domain]):>8}")
    return "\n".join(lines)


def summary(doc: dict) -> str:
    base, rounds = doc["base_domain_loss"], doc["rounds"]
    last = rounds[-1]["domain_loss"]
    better = [d for d in base if last[d] < base[d]]
    worse = [d for d in base if last[d] > 1.01 * base[d]]
    changes = ", ".join(f"{d} {_pct(last[d], base[d])}" for d in base)
    return (f"\ndemo: {len(rounds)} round(s) in {doc.get('seconds', 0):.0f}s, version {rounds[-1]['version']}; "
            f"held-out loss vs base: {changes}; improved on {len(better)} domain(s)"
            + (f", more than 1% worse on {worse}" if worse else ""))
