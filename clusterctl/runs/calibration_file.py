"""Writing a [calibration] table into a profile file: that table replaced (or appended at the end),
every other byte of the file as it was, its comments included.

A TOML library reads and writes data, not text: tomllib keeps no comments and tomli_w writes a whole
document, so the table's own text is replaced by hand (`replace_table`), the new table rendered by
tomli_w. The result is checked before anything is written (`updated_text`): parsed, it must hold the
same data outside [calibration] as the old file and exactly the new figures in it, and be a valid
profile; then it replaces the file atomically, so a bad write never lands. A shipped profile is never
edited in place: the copy goes to the user's profile directory, which comes first in the search and
so shadows it (`destination`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError

TABLE = "calibration"
# A table header line, [name] or [[name]], with an optional comment after it; group 1: the dotted name.
_HEADER = re.compile(r"\s*\[\[?\s*([^\[\]#]*?)\s*\]\]?\s*(#.*)?")


def _table_of(line: str) -> str | None:
    """The name a header line opens (pure); None for any other line."""
    m = _HEADER.fullmatch(line.rstrip("\r\n"))
    return m.group(1).replace(" ", "") if m else None


def _ours(name: str | None) -> bool:
    return name is not None and (name == TABLE or name.startswith(TABLE + "."))


def render(figures: dict[str, Any]) -> str:
    """The table's text, as tomli_w writes it ([calibration], then [calibration.matmul_gflops])."""
    import tomli_w

    return tomli_w.dumps({TABLE: figures})


def replace_table(text: str, table: str) -> str:
    """`text` with its [calibration] table (header, its [calibration.*] sub-tables, their lines) replaced
    by `table`, or `table` appended when there is none (pure). The comments and blank lines right above
    the next table's header stay: they belong to that table."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _ours(_table_of(line))), None)
    if start is None:
        lead = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + lead + table
    end = start + 1
    while end < len(lines) and ((name := _table_of(lines[end])) is None or _ours(name)):
        end += 1
    if end == len(lines):
        return "".join(lines[:start]) + table
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1  # the next table's leading comments and blank lines
    gap = "" if not lines[end].strip() else "\n"
    return "".join(lines[:start]) + table + gap + "".join(lines[end:])


def updated_text(old: str, figures: dict[str, Any], where: str) -> str:
    """The profile's new text with `figures` as its [calibration] table, checked (pure): the same data
    as `old` outside the table, exactly `figures` in it, and a valid profile (profiles.parse_profile, as
    read_profile does); else one line naming the file, and nothing is written."""
    from clusterctl.planning.profiles import parse_profile
    from vltrain.common.schema import parse_toml

    new = replace_table(old, render(figures))
    before, after = parse_toml(old, where), _parse(new, where)
    before.pop(TABLE, None)
    if after.pop(TABLE, None) != figures or after != before:
        raise UserError(
            f"{where}: its [{TABLE}] table could not be replaced in place (a {TABLE} key outside a "
            f"[{TABLE}] header, or a line starting with '[' inside a multi-line string); nothing written; "
            f"allowed: remove the old {TABLE} lines by hand and run again"
        )
    parse_profile(_parse(new, where), where)
    return new


def _parse(text: str, where: str) -> dict[str, Any]:
    from vltrain.common.schema import parse_toml

    try:
        return parse_toml(text, where)
    except UserError as e:  # the old file parsed: the replacement broke it
        raise UserError(f"{e}; nothing written") from None


def destination(path: Path, origin: str) -> Path:
    """Where the calibrated profile goes: the file itself, or for a shipped one (origin "shipped",
    never edited in place: an upgrade would overwrite it, an installed wheel may be read-only) a copy
    of the same name in the user's profile directory, which shadows it."""
    from clusterctl.planning.profiles import user_dir

    return user_dir() / path.name if origin == "shipped" else path


def write(path: Path, origin: str, figures: dict[str, Any], dry_run: bool = False) -> Path:
    """Write `figures` into the profile at `path` (edge) and return the file written (the one that would
    be, for a dry run: checked, not written). The file keeps its permissions; a copy gets the default."""
    from clusterctl.planning.profiles import PROFILE_MAX
    from vltrain.common import safe_read
    from vltrain.common.atomic import atomic_path

    try:
        old = safe_read.read_text_capped(path, PROFILE_MAX)
    except (OSError, UnicodeDecodeError, safe_read.NotReadable) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    dest = destination(path, origin)
    new = updated_text(old, figures, str(dest))
    if dry_run:
        return dest
    mode = os.stat(path).st_mode & 0o7777 if dest == path else None
    try:
        with atomic_path(dest, mode) as tmp:
            tmp.write_text(new, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{dest}: cannot write: {e}; nothing written") from None
    return dest
