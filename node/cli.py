"""The `expertmesh` command line. Each command parses flags, calls one library function, prints.

Heavy imports (torch, transformers, grpc, hivemind) happen inside commands so `--help` is fast.
User mistakes raise ValueError/OSError; `main` turns them into one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="expertmesh: fine-tune MoE models domain by domain over a peer-to-peer mesh.")


class UsageError(ValueError):
    """A user mistake caught by the CLI itself."""


def main() -> None:
    try:
        app(standalone_mode=False)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
