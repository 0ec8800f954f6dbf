"""The current version's model in memory, and what is derived from it once per version.

Scoring adds a delta to this model and restores it bit for bit (scoring.applied); merging writes
the next version's weights into it. Version 0 is the configured base checkpoint, imported once
through the same publishing path as every later version, so miners fetch it like any other.
"""
from __future__ import annotations

import logging
from pathlib import Path

from expertmesh.node.moe import MoEModel, load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.validator.checks import expert_norms
from expertmesh.validator.ledger import Ledger, VersionRow
from expertmesh.protocol import manifest as mf
from expertmesh.validator.publish import manifest_sha256, version_dir, write_checkpoint

log = logging.getLogger(__name__)


class ModelRuntime:
    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints
        self.moe: MoEModel | None = None
        self.tokenizer = None
        self.version: int | None = None
        self.manifest_sha256: str = ""
        self.norms: dict[tuple[int, int], float] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def load(self, row: VersionRow) -> None:
        """Load a published version, checking its files against the manifest first."""
        directory = version_dir(self.checkpoints, row.version)
        mf.verify(directory)
        if manifest_sha256(directory) != row.manifest_sha256:
            raise ValueError(f"{directory}: manifest differs from the ledger's; the state directory was altered")
        self.moe, self.tokenizer = load_model(directory)
        self.version, self.manifest_sha256 = row.version, row.manifest_sha256
        self.refresh()

    def refresh(self) -> None:
        """Recompute the per-version caches after the weights changed in place."""
        self.moe.model.eval()
        self.norms = expert_norms(self.moe)
        self.shapes = self.moe.expert_shapes()


def import_base(ledger: Ledger, checkpoints: Path, model_path: Path | None, clock_ms: int) -> VersionRow:
    """Publish the base checkpoint as version 0 (once; a crash halfway redoes it)."""
    row = ledger.version(0)
    if row is not None:
        return row
    source = Path(model_path or DEFAULT_MODEL)
    moe, tokenizer = load_model(source)
    manifest = {"parent": None, "parent_manifest_sha256": None, "round": None, "source": str(source),
                "accepted": [], "leaderboard": []}
    directory = write_checkpoint(moe.model, tokenizer, checkpoints, 0, manifest)
    row = VersionRow(version=0, parent=None, round=None, dir=directory.name,
                     manifest_sha256=manifest_sha256(directory), published_ms=clock_ms)
    with ledger.transaction() as db:
        ledger.add_version(db, row)
    log.info("imported base model as version 0", extra={"source": str(source), "dir": str(directory)})
    return row
