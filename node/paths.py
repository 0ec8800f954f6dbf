"""Where the shipped model and the demo corpora live: inside the installed package, never the repository."""
from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-moe"
SHIPPED_DATA = ASSETS / "data"  # GSM8K train (MIT, LICENSE.gsm8k beside it) and Tiny Shakespeare, gzipped


def data_dir() -> Path:
    """The demo corpora's folder: the shipped one, or the folder the EXPERTMESH_DATA variable names."""
    named = os.environ.get("EXPERTMESH_DATA")
    path = Path(named) if named else SHIPPED_DATA
    if not path.is_dir():
        raise FileNotFoundError(f"EXPERTMESH_DATA={named} is not a folder; point it at one holding the demo corpora "
                                "(gsm8k_train.jsonl[.gz], tinyshakespeare.txt[.gz]) or unset it to use the shipped ones")
    return path


def corpus(name: str) -> Path:
    """A demo corpus file by its plain name (e.g. `gsm8k_train.jsonl`), gzip-compressed (`name.gz`) or not."""
    folder = data_dir()
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder} holds neither {name}.gz nor {name}; point EXPERTMESH_DATA at a folder "
                            "that has the demo corpora, or unset it to use the shipped ones")
