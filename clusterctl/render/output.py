"""Where the CLI prints: one rich console for humans, plain JSON for scripts (figures: render.units).

JSON is strict (RFC 8259): NaN and Infinity, which json.dumps would write bare, are printed as null
(clusterctl.runs.artifacts.dumps_strict, the same helper the registry writes with).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    err_console: Console


def __getattr__(name: str):
    """The consoles are made on first use: importing rich.console costs ~25 ms that `status --json`
    and other plain-text paths never need (module __getattr__, PEP 562)."""
    if name in ("console", "err_console"):
        from rich.console import Console

        value = Console(highlight=False, stderr=name == "err_console")
        globals()[name] = value
        return value
    raise AttributeError(name)


def print_json(data: Any) -> None:
    """Machine-readable output: strict JSON on stdout (non-finite numbers as null), no colour,
    stable key order."""
    from clusterctl.runs.artifacts import dumps_strict

    sys.stdout.write(dumps_strict(data, indent=2, default=str) + "\n")


def print_json_stream(head: dict[str, Any], key: str, rows: Iterable[Any]) -> None:
    """One JSON object written as it is made: `head`'s keys, then `key` as a list of `rows` written
    one per line, each as soon as it comes (memory and time flat in the row count: no indent, whose
    encoder is pure Python). A row is a JSON-able value, or JSON text already (a str: written as it
    is). Strict like print_json: a row with NaN or infinity has them as null."""
    import json

    from clusterctl.runs.artifacts import finite

    enc = json.JSONEncoder(allow_nan=False, default=str)
    out = sys.stdout
    out.write(enc.encode(finite(head))[:-1] + (", " if head else "") + f"{enc.encode(key)}: [")
    sep = "\n"
    for row in rows:
        if isinstance(row, str):
            text = row
        else:
            try:
                text = enc.encode(row)
            except ValueError:  # NaN or infinity somewhere in it
                text = enc.encode(finite(row))
        out.write(sep + text)
        sep = ",\n"
    out.write("\n]}\n")
