"""Plain text out: lines with a few styles on a terminal, and aligned tables (pure but for writing).

The commands that must start fast (`status`, `plan`, `estimate`, `report`) print through here, not
through rich's Console and Table: importing rich.console and rich.table costs ~25 ms, as much as
all of `plan`'s own work, and rich measures every cell through its renderable protocol (97 % of a
report over 10,000 runs). What these commands print is lines and columns of short text, which need
none of that. Styles are written by hand as ANSI SGR codes for the same reason (a handful of codes,
not a library), following the conventions rich follows: styles only on a terminal or under
FORCE_COLOR, none on a dumb terminal (TERM=dumb or unknown), and no colours under NO_COLOR (bold and
dim stay). Commands that draw boxes or a live view (profiles, presets, watch) still use rich.
"""

from __future__ import annotations

import os
import sys
from itertools import repeat
from typing import TextIO

_SGR = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33"}
_COLOURS = ("red", "green", "yellow")


def shows_styles(stream: TextIO) -> bool:
    """Whether `stream` gets ANSI styles: a terminal (or FORCE_COLOR set), not a dumb one."""
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def styled(text: str, style: str | None, stream: TextIO | None = None) -> str:
    """`text` in `style` (space-separated: "bold", "dim", "red", "green", "yellow") when `stream`
    (stdout by default) shows styles; else `text` as it is."""
    if not style or not shows_styles(stream or sys.stdout):
        return text
    words = style.split()
    if os.environ.get("NO_COLOR"):
        words = [w for w in words if w not in _COLOURS]
    codes = ";".join(_SGR[w] for w in words)
    return f"\x1b[{codes}m{text}\x1b[0m" if codes else text


def say(text: str = "", style: str | None = None, err: bool = False) -> None:
    """One line (or several) on stdout (`err`: stderr), the whole of it in `style`. Never wrapped:
    a line per fact, as long as it is (the terminal folds it, grep finds it whole)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(styled(text, style, stream) + "\n")


def output_text(text: str, wrap: int | None = None) -> None:
    """Plain text on stdout, folded at word boundaries to `wrap` columns (None: as it is)."""
    if wrap:
        import textwrap

        text = "\n".join(
            textwrap.fill(p, wrap, break_long_words=False, break_on_hyphens=False) for p in text.split("\n")
        )
    sys.stdout.write(text + "\n")


TERMINAL = -1  # table_text's default width: the terminal's ($COLUMNS first), none when output is piped


def terminal_width() -> int | None:
    """Columns to fit: the terminal's, or $COLUMNS; None when output goes to a pipe or file (keep all)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(1).columns if os.isatty(1) else None
    except OSError:
        return None


def table_text(
    title: str,
    heads: list[list[str]],
    columns: list[list[str]],
    right: list[bool],
    width: int | None = TERMINAL,
    gap: int = 3,
) -> str:
    """Columns of cells as aligned text: the title, a blank line, headers (bottom-aligned, one list
    of lines per column), a rule, the rows, a blank line; `gap` spaces between columns, 1 before the
    first. Without any header line, no rule either (a list of names and values).

    Made to fit `width` (TERMINAL: the terminal's, or $COLUMNS, none when output goes to a pipe;
    None: never), never by cutting a cell: first by a gap of 2; when a narrower first column makes the table fit (down
    to 8 characters), a key longer than it goes whole on a line of its own and its values on the
    next (a run id, a month is never split); then a last-column value too long for the room left
    is wrapped at spaces onto the next lines, in its column (a number or a word is never split).
    A table that cannot fit so is left wider."""
    if width == TERMINAL:
        width = terminal_width()
    n = len(heads)
    sep = " " * gap
    uniq = [set(c) for c in columns]  # the distinct cells: 10,000 rows repeat most values but the keys
    widths = [max(max(map(len, h), default=0), max(map(len, u), default=0)) for h, u in zip(heads, uniq, strict=True)]
    pieces: dict[str, list[str]] = {}  # last-column values wrapped onto several lines
    if width is not None and n > 1 and gap > 2 and sum(widths) + gap * (n - 1) + 1 > width >= sum(widths) + 2 * n - 1:
        gap, sep = 2, "  "  # two spaces still part columns: better than a key on a line of its own
    if width is not None and n > 1 and sum(widths) + gap * (n - 1) + 1 > width:
        # the room the keys keep if the last column wraps down to 16 characters (or its own width)
        keys_room = width - 1 - sum(widths[1:-1]) - min(widths[-1], 16) - gap * (n - 1)
        if keys_room < widths[0]:  # keys move to their own line too
            widths[0] = min(widths[0], max(8, keys_room, *(len(h) for h in heads[0])))
        room = width - 1 - sum(widths[:-1]) - gap * (n - 1)
        if 16 <= room < widths[-1]:
            import textwrap

            for v in uniq[-1]:
                if len(v) > room:
                    pieces[v] = textwrap.wrap(v, room, break_long_words=False, break_on_hyphens=False) or [v]
            longest = [len(p) for ps in pieces.values() for p in ps]
            widths[-1] = max(max(longest), max((len(v) for v in uniq[-1] if v not in pieces), default=0))
            widths[-1] = max(widths[-1], 0, *(len(h) for h in heads[-1]))
    depth = max(len(h) for h in heads)
    fmt = " " + sep.join(f"{{:{'>' if r else '<'}{w}}}" for w, r in zip(widths, right, strict=True))
    out = [title, ""]
    for k in range(depth):
        out.append(fmt.format(*(h[k - (depth - len(h))] if k >= depth - len(h) else "" for h in heads)).rstrip())
    if depth:
        out.append(" " + "\u2500" * (sum(widths) + gap * (n - 1)))
    w0 = widths[0]
    if not pieces and max(map(len, uniq[0]), default=0) <= w0:  # nothing moved: whole columns padded, rows joined
        cells = [_padded(c, u, w, r) for c, u, w, r in zip(columns, uniq, widths, right, strict=True)]
        cells[0] = list(map(" ".__add__, cells[0]))  # the space before the first column, on the short cell
        rows = map(sep.join, zip(*cells, strict=True))
        if not right[-1] or any(not v or v[-1].isspace() for v in uniq[-1]):  # else no row ends in a space
            rows = map(str.rstrip, rows)
        out.extend(rows)
        out.append("")
        return "\n".join(out)
    line, blank = fmt.format, [""] * (n - 1)
    for row in zip(*columns, strict=True):
        key, last = row[0], row[-1]
        if len(key) > w0:  # whole, alone, then the values under a blank key
            out.append(" " + key)
            key = ""
        first, *more = pieces.get(last, [last]) if n > 1 else [last]
        out.append(line(key, *row[1:-1], first).rstrip() if n > 1 else line(key).rstrip())
        out.extend(line(*blank, piece).rstrip() for piece in more)
    out.append("")
    return "\n".join(out)


def _padded(cells: list[str], uniq: set[str], width: int, right: bool) -> list[str]:
    """One column's cells (`uniq`: the distinct ones) padded to `width`, right- or left-aligned; a
    value that repeats (most do, but for keys) is padded once."""
    if 4 * len(uniq) <= len(cells):
        pad = {v: v.rjust(width) if right else v.ljust(width) for v in uniq}
        return list(map(pad.__getitem__, cells))
    return list(map(str.rjust if right else str.ljust, cells, repeat(width)))
