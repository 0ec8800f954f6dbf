"""`expertmesh dataset submit` and `expertmesh dataset list`: the flows, printing as they go.

submit: check the file locally first (bad input ends here, nothing contacted), then fetch the
validator's tokenizer, count tokens, show a preview and the figures, and upload the payload signed
and chunked. The validator answers with the dataset id and its train/held-out split.
"""
from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from expertmesh.node.data import DataError
from expertmesh.protocol.files import file_sha256
from expertmesh.node.submission.prepare import Prepared, SubmitLimits, count_tokens, payload_texts, prepare
from expertmesh.node.submission.tokenizer import validator_tokenizer
from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient, sign_upload
from expertmesh.protocol.types import check_domain

Print = Callable[[str], None]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _label(path: Path) -> str:
    """The dataset's name in the envelope: the file name, printable, at most 128 bytes."""
    name = re.sub(r"[^\w.\- ]", "_", path.name) or "dataset"
    return name.encode("utf-8")[:128].decode("utf-8", "ignore")


def _preview(text: str, width: int = 100, lines: int = 3) -> list[str]:
    rows = [r[:width] + ("…" if len(r) > width else "") for r in text.splitlines()[:lines]]
    return rows + (["…"] if len(text.splitlines()) > lines else [])


def show(prepared: Prepared, tokens: int, path: Path, version: int, say: Print) -> None:
    say(f"file: {path} ({_mb(prepared.source_bytes)})")
    say(f"records: {prepared.records:,}" + (f" ({prepared.skipped_empty:,} empty skipped)" if prepared.skipped_empty else ""))
    say(f"tokens: {tokens:,} (tokenizer of the validator's model version {version})")
    say(f"size: {_mb(prepared.text_bytes)} of text, {_mb(prepared.payload.stat().st_size)} compressed upload")
    say("preview:")
    for i, text in enumerate(prepared.preview, 1):
        for j, row in enumerate(_preview(text)):
            say(f"  [{i}] {row}" if j == 0 else f"      {row}")


def submit(path: Path, domain: str, validator: str, key_file: Path, text_field: str | None = None,
           template: str | None = None, limits: SubmitLimits = SubmitLimits(), cache_dir: Path | None = None,
           dry_run: bool = False, say: Print = print, timeout_s: float = 60.0) -> str | None:
    """Register `path` for `domain`; the dataset id (None for a dry run). ValueError/OSError on any problem."""
    from expertmesh.node.submission.tokenizer import default_cache_dir

    check_domain(domain)
    key = identity.load_key(key_file)
    with tempfile.TemporaryDirectory(prefix="expertmesh-submit-") as tmp:
        prepared = prepare(path, Path(tmp) / "payload.jsonl.gz", text_field, template, limits)
        with ValidatorClient(validator, ClientConfig(call_timeout_s=timeout_s)) as client:
            tokenizer, rnd = validator_tokenizer(client, cache_dir or default_cache_dir())
            tokens = count_tokens(tokenizer, payload_texts(prepared.payload))
            if tokens < limits.min_tokens:
                raise DataError(f"{path}: {tokens:,} tokens, fewer than the minimum of {limits.min_tokens:,} "
                                "(a validator holds ~5% out for scoring); add more records")
            show(prepared, tokens, path, rnd.model_version, say)
            if dry_run:
                say("dry run: nothing sent")
                return None
            env = sign_upload("dataset", key, prepared.payload, model_version=rnd.model_version,
                              model_sha256=rnd.model_sha256, round=rnd.round, domain=domain, label=_label(path))
            receipt = client.register_dataset(prepared.payload, env)
    say(f"registered: dataset {receipt.dataset_id} (domain {domain})" +
        (f": {receipt.message}" if receipt.message else ""))
    return receipt.dataset_id


def list_datasets(validator: str, domain: str | None = None, counts: bool = True, cache_dir: Path | None = None,
                  say: Print = print, timeout_s: float = 60.0) -> list[dict]:
    """Print the validator's datasets; with counts, fetch each train part (cached by sha256) to count it."""
    from expertmesh.node.submission.tokenizer import default_cache_dir

    if domain is not None:
        check_domain(domain)
    cache = Path(cache_dir or default_cache_dir())
    rows = []
    with ValidatorClient(validator, ClientConfig(call_timeout_s=timeout_s)) as client:
        infos = sorted(client.list_datasets(domain), key=lambda i: (i.domain, i.registered_ms, i.dataset_id))
        tokenizer = validator_tokenizer(client, cache)[0] if counts and infos else None
        for info in infos:
            row = {"domain": info.domain, "dataset_id": info.dataset_id, "name": info.name, "train_bytes": info.size}
            if tokenizer is not None:
                path = cache / "datasets" / f"{info.sha256.hex()}.jsonl"
                if not path.is_file() or file_sha256(path) != info.sha256.hex():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    client.fetch_dataset(info.dataset_id, path, expected_sha256=info.sha256)
                from expertmesh.node.data import iter_texts

                texts = list(iter_texts(path))
                row |= {"train_records": len(texts), "train_tokens": count_tokens(tokenizer, iter(texts))}
            rows.append(row)
    if not rows:
        say("no datasets registered" + (f" for domain {domain}" if domain else ""))
        return rows
    head = f"{'domain':<12} {'dataset':<30} {'name':<24} {'train MB':>9}"
    say(head + (f" {'records':>9} {'tokens':>11}" if counts else ""))
    for r in rows:
        line = f"{r['domain']:<12} {r['dataset_id']:<30} {r['name'][:24]:<24} {r['train_bytes'] / 1e6:>9.2f}"
        say(line + (f" {r['train_records']:>9,} {r['train_tokens']:>11,}" if counts else ""))
    return rows
