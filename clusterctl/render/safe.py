"""Text a user controls, made safe to print: the one helper every printer of such text uses.

A profile's description, a run's name or id, a reason line from failures/rankNNNNN.json, a log line
or a value from metrics.jsonl can hold terminal escapes (ESC, CSI), NUL, carriage returns or bidi
overrides; printed raw they recolour, move the cursor, clear or rewrite the screen, or make text
read differently than it is. `printable` shows each such character escaped (`\\x1b`, `\\x00`,
`\\u202e`), bytes that were not UTF-8 (argv and paths are surrogate-escaped) as `\\xNN`, and leaves
all other text, non-ASCII letters included, as it is. `cell` is the same for rich tables, which
would otherwise read `[...]` as markup. JSON output needs neither: JSON escapes control characters.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _table() -> dict[int, str]:
    """str.translate's table, made on the first text that needs it (~2,300 entries: most commands
    print only printable text and never pay for it)."""
    # C0 controls, DEL, C1 controls: shown as \xNN
    table: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    # bidi embeddings, overrides and isolates, line/paragraph separators, zero-width marks, BOM
    table |= {
        c: f"\\u{c:04x}"
        for c in (
            0x200B,
            0x200C,
            0x200D,
            0x200E,
            0x200F,
            *range(0x202A, 0x202F),
            *range(0x2066, 0x206A),
            0x2028,
            0x2029,
        )
    }
    table[0xFEFF] = "\\ufeff"
    # lone surrogates: U+DC80..U+DCFF are undecodable bytes (surrogateescape); others as \udXXX
    table |= {c: (f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}") for c in range(0xD800, 0xE000)}
    return table


def printable(value: Any) -> str:
    """`value` as text with every control, bidi or undecodable character escaped (see above);
    '-' for None. Plain text comes back as it is (one isprintable() check)."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return text.translate(_table())


def cell(value: Any, style: str = ""):
    """`printable(value)` as a rich Text: no markup is read from it."""
    from rich.text import Text

    return Text(printable(value), style=style)
