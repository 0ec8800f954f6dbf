"""The validator behind its real gRPC server, in process: the scheduler is stepped by hand, so no timing."""
import json
import shutil

import pytest
from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.errors import RemoteError
from expertmesh.protocol.server import ServerConfig, ValidatorServer
from expertmesh.protocol.types import CheckpointRef
from expertmesh.validator.publish import version_dir
from valhelpers import encode, negated, register, run_until, submit

KEYS = [identity.generate_key() for _ in range(4)]


@pytest.fixture
def served(make_node):
    servers = []

    def serve(node):
        servers.append(ValidatorServer(node.service, ServerConfig(spool_dir=node.spool.incoming)))
        return ValidatorClient(servers[-1].address, ClientConfig(call_timeout_s=10, upload_timeout_s=30))

    yield serve
    for s in servers:
        s.stop(0)


def test_empty_round_publishes_nothing_and_reopens(make_node, served, math_payload, trained):
    node = make_node(rounds={"max_submissions": 1})
    client = served(node)
    register(client, KEYS[3], math_payload)
    submit(client, KEYS[1], encode(negated(trained.delta), 0))
    run_until(node, lambda n: n.book.current().round == 2)
    assert node.ledger.round(1).state == "empty" and node.book.current().base_version == 0
    assert node.ledger.latest_version().version == 0 and not version_dir(node.runtime.checkpoints, 1).exists()
    assert client.get_round().model_version == 0


def expect_refusal(client, code, fn, match):
    with pytest.raises(RemoteError) as exc:
        fn()
    assert exc.value.code == code and match in exc.value.details, exc.value
    assert client.get_round().round >= 1, "the server still answers after a refusal"


def test_refusals_over_the_wire(make_node, served, math_payload, trained, tmp_path):
    node = make_node(scoring={"domains": ["math", "code"]})
    client = served(node)
    good = encode(trained.delta, 0)
    expect_refusal(client, "FAILED_PRECONDITION", lambda: submit(client, KEYS[0], good), "not scored in round 1")
    register(client, KEYS[3], math_payload)
    expect_refusal(client, "FAILED_PRECONDITION", lambda: register(client, KEYS[3], math_payload, domain="law"),
                   "not evaluated here")
    expect_refusal(client, "FAILED_PRECONDITION", lambda: submit(client, KEYS[0], good, round=7), "round 7 is not open")
    expect_refusal(client, "FAILED_PRECONDITION", lambda: submit(client, KEYS[0], good, model_sha256=b"\1" * 32),
                   "fetch it and train again")
    expect_refusal(client, "INVALID_ARGUMENT", lambda: submit(client, KEYS[0], b"not a delta at all"), "invalid delta")
    expect_refusal(client, "INVALID_ARGUMENT", lambda: submit(client, KEYS[0], encode(trained.delta, 5)),
                   "header says version 5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    expect_refusal(client, "INVALID_ARGUMENT", lambda: register(client, KEYS[3], bad), 'line 2 has no string field "text"')
    submit(client, KEYS[0], good)
    expect_refusal(client, "ALREADY_EXISTS", lambda: submit(client, KEYS[0], encode(negated(trained.delta), 0)),
                   "already made 1")
    expect_refusal(client, "NOT_FOUND", lambda: client.fetch_checkpoint_file(CheckpointRef(0, "../ledger.sqlite"),
                                                                             tmp_path / "x"), "not a file")
    expect_refusal(client, "NOT_FOUND", lambda: client.fetch_manifest(tmp_path / "x", version=9), "not served")
    expect_refusal(client, "NOT_FOUND", lambda: client.fetch_dataset("math-0000", tmp_path / "x"), "no dataset")
    assert len(node.ledger.submissions(node.book.current().round)) == 1


def test_datasets_listed_and_only_the_train_split_served(make_node, served, math_payload, math_texts, tmp_path):
    node = make_node()
    client = served(node)
    receipt = register(client, KEYS[3], math_payload)
    again = register(client, KEYS[2], math_payload)
    assert again.dataset_id == receipt.dataset_id
    (info,) = client.list_datasets("math")
    assert info.dataset_id == receipt.dataset_id and info.name == "gsm8k-part" and client.list_datasets("code") == []
    client.fetch_dataset(info.dataset_id, tmp_path / "train.jsonl", expected_sha256=info.sha256)
    served_texts = [json.loads(l)["text"] for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = list(node.registry.heldout_texts([info.dataset_id]))
    assert held and not set(held) & set(served_texts) and set(held) | set(served_texts) == set(math_texts)


def test_merge_is_deterministic_and_a_redo_after_a_crash_is_byte_identical(make_node, served, math_payload, trained,
                                                                               trained_other):
    """Two rounds with momentum; at the second round's merge the state is copied (what kill -9 leaves) and a
    second validator restarted from the copy publishes byte-identical checkpoint and momentum files."""
    cfg = dict(rounds={"max_submissions": 2}, merge={"outer_lr": 0.3})  # gentle: round 2's deltas still help
    node = make_node("a", **cfg)
    client = served(node)
    register(client, KEYS[3], math_payload)
    first = node.book.current().round  # round 1 had nothing to score; the registration opened this one
    early = trained_other.delta  # another miner's own work (a part of the first one's would be a copy)
    for version, scale in ((0, 1.0), (1, 0.5)):
        for key, delta in ((KEYS[0], trained.delta), (KEYS[1], early)):
            submit(client, key, encode({k: v * scale for k, v in delta.items()}, version))
        done = ((lambda n: n.book.current().round == first + 1) if version == 0
                else (lambda n: n.book.current().state == "merging"))
        run_until(node, done)
    verdicts = [v.verdict for r in (first, first + 1) for v in node.ledger.verdicts(r).values()]
    assert verdicts == ["accepted"] * 4, verdicts
    assert node.book.current().round == first + 1 and node.book.current().state == "merging"

    a = node.cfg.state_dir
    b = a.parent / "b"
    shutil.copytree(a, b)  # ledger.sqlite and its WAL as they are on disk, spool, checkpoints, momentum
    run_until(node, lambda n: n.book.current().round == first + 2)
    replica = make_node("b", **cfg)
    assert replica.book.current().state == "merging" and replica.runtime.version == 1
    run_until(replica, lambda n: n.book.current().round == first + 2)

    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*")
                   if p.is_file() and p.parts[len(a.parts)] in ("checkpoints", "momentum"))
    # The second round touched every expert the first did, so its momenta (built on the first's) replaced them all.
    assert {f.rsplit("/", 1)[0] for f in files if f.startswith("momentum/")} == {f"momentum/r{first + 1}"}
    assert "checkpoints/v2/model.safetensors" in files
    assert replica.ledger.version(2).manifest_sha256 == node.ledger.version(2).manifest_sha256
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_heldout_membership_is_keyed_by_the_validators_secret(make_node, math_texts, tmp_path):
    """Which records a validator scores on cannot be recomputed from the data: the public content-hash
    rule shares only about `fraction` of them, another validator (another key) holds out others, and
    the key stays in the state directory, readable by its owner only."""
    from expertmesh.protocol.heldout import split
    from expertmesh.validator.registry import write_payload

    local = write_payload(math_texts, tmp_path / "mine.jsonl")
    held = []
    for name in ("a", "b"):
        node = make_node(name, datasets={"heldout_fraction": 0.2})
        assert node.service.current_round().heldout_fraction == 0.2
        key_file = node.cfg.state_dir / "heldout.key"
        assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
        row = node.registry.register(local, "math", "gsm8k", "ab" * 32)
        held.append(set(node.registry.heldout_texts([row.dataset_id])))
    _, public = split(math_texts, 0.2)
    for scored in held:
        assert 300 < len(scored) < 500  # about 20% of 2,000
        shared = len(scored & set(public)) / len(scored)
        assert 0.1 < shared < 0.3, f"{shared:.2f} of the scored records are the public rule's: as by chance (0.2)"
    assert 0.1 < len(held[0] & held[1]) / len(held[0]) < 0.3
