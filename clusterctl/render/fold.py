"""Long lines folded at spaces to the terminal's width, so that the terminal never cuts a number or a
command (pure but for reading COLUMNS and whether stdout is a terminal). `plan`, `estimate` and the
dry run print their prose lines through `tell`; piped output with no COLUMNS stays a line per fact.
"""

from __future__ import annotations

from clusterctl.render.text import say


def width() -> int | None:
    """The columns to fold long lines to: COLUMNS, else the terminal's; None when neither says (a pipe
    gets a line per fact, whole for grep)."""
    import os
    import shutil
    import sys

    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) >= 20:
        return int(cols)
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def fold(text: str, indent: str = "  ") -> str:
    """A line folded at spaces to width(), the next lines indented: the terminal never cuts a number.
    A flag group "(--a 1 --b 2)" and a quoted command "`clusterctl plan --profile P`" stay on one
    line, so they can be copied whole."""
    cols = width()
    if cols is None or len(text) <= cols:
        return text
    words: list[str] = []
    closer = ""  # what ends the group being read: ")" or "`"
    for w in text.split(" "):
        if closer:
            words[-1] += " " + w
        else:
            words.append(w)
            closer = ")" if w.startswith("(--") else "`" if w.startswith("`") else ""
            w = w[1:]
        if closer and w.rstrip(".,;:").rstrip(")" if closer == "`" else "").endswith(closer):
            closer = ""
    lines, line = [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > cols:
            lines.append(line)
            line = indent + w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join([*lines, line])


def tell(text: str) -> None:
    """say() a line folded to the terminal's width."""
    say(fold(text))
