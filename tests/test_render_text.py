"""clusterctl.render.text: styles only where a terminal shows them, and aligned plain tables (the
output of status, plan, estimate and report, which do not import rich)."""

from __future__ import annotations

import io

import pytest

from clusterctl.render.text import say, styled, table_text


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_styles_only_on_a_terminal(clean_env):
    assert styled("fits", "green", io.StringIO()) == "fits"  # a pipe or file: the text as it is
    assert styled("fits", "green", Tty()) == "\x1b[32mfits\x1b[0m"
    assert styled("total", "bold red", Tty()) == "\x1b[1;31mtotal\x1b[0m"
    assert styled("x", None, Tty()) == "x"


def test_no_color_dumb_terminal_and_force_color(clean_env):
    clean_env.setenv("NO_COLOR", "1")
    assert styled("fits", "green", Tty()) == "fits"  # no colours...
    assert styled("RUN", "bold", Tty()) == "\x1b[1mRUN\x1b[0m"  # ...but bold and dim stay (as rich does)
    clean_env.delenv("NO_COLOR")
    clean_env.setenv("FORCE_COLOR", "1")
    assert styled("fits", "green", io.StringIO()) == "\x1b[32mfits\x1b[0m"
    clean_env.setenv("TERM", "dumb")
    assert styled("fits", "green", Tty()) == "fits"


def test_say_writes_whole_lines_to_the_stream_it_styles_for(clean_env, capsys):
    say("a line longer than any terminal " * 10, style="bold")
    say("to stderr", err=True)
    out, err = capsys.readouterr()
    assert out == "a line longer than any terminal " * 10 + "\n"  # never wrapped, not a terminal: no codes
    assert err == "to stderr\n"


def _rows_one_by_one(title, heads, columns, right):
    """The layout table_text promises, written out row by row (its docstring)."""
    widths = [max(max(map(len, h), default=0), max(map(len, c))) for h, c in zip(heads, columns)]
    cell = lambda v, w, r: v.rjust(w) if r else v.ljust(w)
    out = [title, ""]
    depth = max(len(h) for h in heads)
    for k in range(depth):
        row = [h[k - (depth - len(h))] if k >= depth - len(h) else "" for h in heads]
        out.append((" " + "   ".join(cell(v, w, r) for v, w, r in zip(row, widths, right))).rstrip())
    if depth:
        out.append(" " + "\u2500" * (sum(widths) + 3 * (len(heads) - 1)))
    for row in zip(*columns):
        out.append((" " + "   ".join(cell(v, w, r) for v, w, r in zip(row, widths, right))).rstrip())
    return "\n".join([*out, ""])


def test_table_columns_align_repeated_and_distinct_values_alike():
    keys = [f"run-{i:03d}" for i in range(40)]
    hours = ["64" if i % 3 else "1,024" for i in range(40)]  # repeated: padded once per value
    source = ["sacct" if i % 2 else "registry" for i in range(40)]
    heads, cols, right = [["run"], ["GPU-h"], ["GPU-h", "source"]], [keys, hours, source], [False, True, False]
    text = table_text("gpu-hours by run", heads, cols, right, 200)
    assert text == _rows_one_by_one("gpu-hours by run", heads, cols, right)
    lines = text.splitlines()
    assert lines[5] == " run-000   1,024   registry" and lines[6] == " run-001      64   sacct"
    for last in (hours, ["" if i % 7 else "5" for i in range(40)], ["1 " if i % 2 else "2" for i in range(40)]):
        heads, cols, right = [["run"], ["GPU-h", "source"], ["x"]], [keys, source, last], [False, False, True]
        assert table_text("t", heads, cols, right, 200) == _rows_one_by_one("t", heads, cols, right)


def test_table_puts_long_keys_whole_on_their_own_line_and_lists_without_header_have_no_rule():
    keys = ["a-run-name-20261206-0012", "short"]
    text = table_text("t", [["run"], ["GPU-h"]], [keys, ["1", "22"]], [False, True], 20)
    lines = text.splitlines()
    assert lines[4:] == [" a-run-name-20261206-0012", "                   1", " short            22"], text
    assert max(len(line) for line in lines if keys[0] not in line) <= 20  # only a key longer than the width
    listing = table_text("estimate: 6w", [[], []], [["GPUs", "GPU-hours"], ["32", "32,256"]], [False, True])
    assert listing == "estimate: 6w\n\n GPUs            32\n GPU-hours   32,256\n"
