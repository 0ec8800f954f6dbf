"""`expertmesh status --validator HOST:PORT`: a validator's round, version and leaderboard, as a rich table.

The leaderboard comes from the latest published manifest (cumulative accepted count and total score
per miner), fetched like any miner would; what the validator sends is checked before it is shown.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from expertmesh.protocol import manifest as mf
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.types import NodeStatus, RoundInfo


@dataclass(frozen=True)
class StatusView:
    status: NodeStatus
    round: RoundInfo
    leaderboard: list[tuple[str, int, float]]  # miner key id, accepted, total score


def _leaderboard(manifest: dict) -> list[tuple[str, int, float]]:
    rows = manifest.get("leaderboard") if isinstance(manifest, dict) else None
    if not isinstance(rows, list):
        raise ValueError("the validator's manifest has no leaderboard list; is it an expertmesh validator?")
    out = []
    for r in rows:
        if not (isinstance(r, dict) and isinstance(r.get("miner"), str) and type(r.get("accepted")) is int
                and isinstance(r.get("total_score"), (int, float))):
            raise ValueError(f"malformed leaderboard entry from the validator: {str(r)[:100]}")
        out.append((r["miner"], r["accepted"], float(r["total_score"])))
    return out


def fetch_status(address: str, timeout_s: float = 10.0) -> StatusView:
    with ValidatorClient(address, ClientConfig(call_timeout_s=timeout_s, download_timeout_s=timeout_s)) as client:
        status, info = client.status(), client.get_round()
        with tempfile.TemporaryDirectory(prefix="expertmesh-status-") as tmp:
            client.fetch_manifest(Path(tmp) / mf.MANIFEST, info.model_version, info.model_sha256)
            manifest = mf.read(Path(tmp), info.model_version)
    return StatusView(status, info, _leaderboard(manifest.doc))


def render(view: StatusView, console) -> None:
    from rich.table import Table

    r = view.round
    console.print(f"validator {view.status.public_key.hex()[:16]}…  round {r.round} ({r.phase.value})  "
                  f"model version {r.model_version}  latest published {view.status.model_version}  "
                  f"domains {', '.join(r.domains) or '-'}")
    table = Table(title="leaderboard")
    table.add_column("miner")
    table.add_column("accepted", justify="right")
    table.add_column("total score", justify="right")
    for miner, accepted, score in view.leaderboard:
        table.add_row(miner[:16] + "…", str(accepted), f"{score:.5f}")
    console.print(table)
