"""Brace patterns in shard specs (`data/{00000..00099}.tar`), counted before they are expanded.

braceexpand (webdataset's dependency, used to expand them) builds every name of a group at once:
`{0..10000000}` is ten million strings and nested groups multiply, so submit and the trainer count the
names first with the same grammar (integer and letter ranges with a step, comma sequences, nesting,
backslash escapes) and refuse a pattern over the bound in one line. Pure, torch- and numpy-free.
"""

from __future__ import annotations

import re

from vltrain.common.errors import UserError

MAX_BRACE_NAMES = 100_000  # names a pattern may expand to: LAION-400M is 41,000 shards of 10,000; more: a directory
MAX_BRACE_DEPTH = 8  # braces inside braces
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # braceexpand's own grammar
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def check_brace_pattern(text: str, what: str = "data.shards") -> int:
    """The number of names `text` expands to, counted without expanding it (braceexpand materialises
    every name of a group at once: `{0..10000000}` is 10M strings, nested groups multiply); one line
    when over MAX_BRACE_NAMES, deeper than MAX_BRACE_DEPTH or unbalanced."""
    allowed = f"allowed: balanced braces at most {MAX_BRACE_DEPTH} deep expanding to at most {MAX_BRACE_NAMES:,} names (a directory of shards for more)"
    depth = deepest = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1
        elif text[i] in "{}":
            depth += 1 if text[i] == "{" else -1
            deepest = max(deepest, depth)
        i += 1
    if deepest > MAX_BRACE_DEPTH:
        raise UserError(f"{what}: brace pattern nested {deepest} deep; {allowed}")
    try:
        count = _count_pattern(text)
    except ValueError:
        raise UserError(f"{what}: unbalanced braces in {text[:80]!r}; {allowed}") from None
    if count > MAX_BRACE_NAMES:
        shown = f"{count:,}" if count < 10**15 else f"at least 10^{len(str(count)) - 1}"
        raise UserError(f"{what}: brace pattern expands to {shown} names; {allowed}")
    return count


def _groups(text: str, split: bool) -> list[tuple[int, int]] | None:
    """(start, end) of the top-level brace groups of `text` (split=False), or of its comma-separated
    items (split=True; None when it has no top-level comma); backslash escapes as braceexpand's."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth, start = depth + 1, (i if depth == 0 and not split else start)
        elif c == "}":
            depth -= 1
            if depth == 0 and not split:
                out.append((start, i))
        elif c == "," and depth == 0 and split:
            out.append((start, i))
            start = i + 1
        i += 1
    if split:
        return [*out, (start, len(text))] if out and depth == 0 else None
    if depth != 0:
        raise ValueError(f"unbalanced braces: {text}")
    return out


def _count_pattern(text: str) -> int:
    """Names braceexpand makes of `text`: the product of its top-level groups' counts (a literal is 1)."""
    count = 1
    for start, end in _groups(text, split=False) or ():
        count = min(count * _count_expression(text[start + 1 : end]), 10**40)
    return count


def _int(digits: str) -> int:
    """int() of a range bound, without Python's 4,300-digit limit: a bound of over 100 digits is +-10^100."""
    if len(digits.lstrip("-0")) > 100:
        return -(10**100) if digits.startswith("-") else 10**100
    return int(digits)


def _count_expression(expr: str) -> int:
    if m := _INT_RANGE.match(expr):
        step = _int(m.group(3) or "1") or 1
        return abs(_int(m.group(2)) - _int(m.group(1))) // step + 1
    if m := _CHAR_RANGE.match(expr):
        from braceexpand import alphabet

        step = int(m.group(3) or 1) or 1
        a, b = (alphabet.index(c) for c in (m.group(1), m.group(2)))
        return abs(b - a) // step + 1
    items = _groups(expr, split=True)
    if items is None:  # not a sequence: the braces stay, the inside is a pattern
        return _count_pattern(expr)
    return sum(_count_pattern(expr[s:e]) for s, e in items)
