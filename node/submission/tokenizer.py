"""The validator's tokenizer: the current version's non-weight files, fetched against its manifest and cached.

Token counts shown before a submission are those the validator's model will see. Only the small
files are fetched (configs and tokenizer files, never the weights), verified like a miner's
checkpoint (node.fetch) and kept per manifest sha256 in the cache directory.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from expertmesh.node.fetch import CheckpointCache, tokenizer_files
from expertmesh.protocol.client import ValidatorClient
from expertmesh.protocol.types import RoundInfo


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "expertmesh"


Encode = Callable[[list[str]], list[list[int]]]  # texts -> token ids, no special tokens


def load_encoder(directory: Path) -> Encode:
    """The tokenizer of a checkpoint directory as a batch encoder.

    A fast tokenizer's tokenizer.json is loaded with the `tokenizers` library alone (no torch or
    transformers import: the CLI stays quick); other checkpoints go through AutoTokenizer. Both give
    the ids the model trains on (node.data.tokenize uses add_special_tokens=False too).
    """
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exception on a malformed file
            raise ValueError(f"cannot load the validator's tokenizer.json: {exc}") from None
        return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        auto = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the validator's tokenizer: {str(exc).splitlines()[0]}") from None
    return lambda texts: auto(texts, add_special_tokens=False)["input_ids"]


def validator_tokenizer(client: ValidatorClient, cache_dir: Path) -> tuple[Encode, RoundInfo]:
    """(encoder, the round it belongs to) for the validator's current model version."""
    rnd = client.get_round()
    cache = CheckpointCache(Path(cache_dir) / "tokenizers", max_bytes=1 << 30, keep=4)
    directory = cache.ensure(client, rnd.model_version, rnd.model_sha256, wanted=tokenizer_files)
    return load_encoder(directory), rnd
