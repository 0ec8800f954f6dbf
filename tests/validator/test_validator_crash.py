"""kill -9 at each dangerous point of a round, restart, and the round still completes exactly once."""
import json

import pytest

from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.manifest import verify
from valhelpers import Daemon, config_doc, encode, ledger_rows, negated, submit, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
KEYS = [identity.generate_key() for _ in range(3)]


def test_sigkill_while_scoring_and_publishing_then_restart(tmp_path, trained, trained_other, math_payload):
    state = tmp_path / "state"
    doc = config_doc(state, datasets={"preload": [{"domain": "math", "path": str(math_payload), "name": "gsm8k"}]})
    config = write_config(tmp_path / "validator.toml", doc)
    log = tmp_path / "validator.log"
    early = trained_other.delta  # a second miner's own update (a part of the first would be a copy)

    def start(pause: str = "") -> Daemon:
        return Daemon(config, log, env={"EXPERTMESH_VALIDATOR_PAUSE": pause})

    def verdicts() -> list[dict]:
        return ledger_rows(state, "SELECT * FROM verdicts WHERE round=1 ORDER BY scored_ms")

    daemon = start("scoring=600")
    try:
        with ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30, upload_timeout_s=60)) as client:
            ids = [submit(client, key, encode(delta, 0))[0].submission_id.hex()
                   for key, delta in zip(KEYS, (trained.delta, negated(trained.delta), early))]
        daemon.wait_for("pause at scoring", 300)
        daemon.kill()  # one verdict committed, two submissions unscored
        first = verdicts()
        assert [v["digest"] for v in first] == ids[:1]

        daemon = start("publish=600")
        daemon.wait_for("pause at publish", 300)
        daemon.kill()  # checkpoint written to its temporary directory, not yet renamed
        scored = verdicts()
        assert sorted(v["digest"] for v in scored) == sorted(ids) and scored[0] == first[0], "nothing scored twice"
        accepted = [v["digest"] for v in sorted(scored, key=lambda v: ids.index(v["digest"])) if v["verdict"] == "accepted"]
        assert accepted == [ids[0], ids[2]]
        assert not (state / "checkpoints" / "v1").exists(), "no half-written version is ever visible"

        daemon = start("commit=600")
        daemon.wait_for("pause at commit", 300)
        daemon.kill()  # v1 renamed into place, the ledger not yet told
        assert (state / "checkpoints" / "v1").exists()
        assert ledger_rows(state, "SELECT state FROM rounds WHERE round=1") == [{"state": "merging"}]

        daemon = start()
        with ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30)) as client:
            wait_until(lambda: client.get_round().model_version == 1, 300, "version 1", daemon)
            assert client.get_round().round == 2
        manifest = verify(state / "checkpoints" / "v1").doc
        assert [a["submission"] for a in manifest["accepted"]] == accepted
        assert verdicts() == scored and len(ledger_rows(state, "SELECT * FROM versions")) == 2
        (version,) = ledger_rows(state, "SELECT * FROM versions WHERE version=1")
        from expertmesh.validator.publish import manifest_sha256

        assert version["manifest_sha256"] == manifest_sha256(state / "checkpoints" / "v1")
        assert not list((state / "checkpoints").glob(".tmp-*")) and not (state / "spool" / "r1").exists()
        assert json.loads((state / "checkpoints" / "v1" / "manifest.json").read_text())["round"] == 1
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
