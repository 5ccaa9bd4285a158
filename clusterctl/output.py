"""Where the CLI prints: one rich console for humans, plain JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from typing import TYPE_CHECKING

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


def quantity(v: float | None) -> str:
    """A measured figure as people read it: 3 significant digits, thousands separators from 100 on,
    no exponent for everyday sizes (0.0123, 4.2, 412, 12,480); '-' when unknown."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 0.001 else f"{v:.1e}"


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, stable key order."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
