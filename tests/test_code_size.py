"""Sizes that keep the code easy to walk (issue 22): no function over 60 lines in vltrain, no module over
600 lines in either package. A function or module that grows past them is a room that wants splitting."""

from __future__ import annotations

import ast

import pytest

from tests.test_architecture import MODULES

MAX_FUNCTION_LINES = 60  # vltrain: def line to last line
MAX_MODULE_LINES = 600


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than `limit` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append((node.name, lines))
    return out


def test_the_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert long_functions(f"def f():\n{body}\n") == [("f", 61)]
    assert long_functions(f"def f():\n{body}\n", limit=61) == []


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.startswith("vltrain")))
def test_no_vltrain_function_is_over_60_lines(mod):
    assert long_functions(MODULES[mod].read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_is_over_600_lines(mod):
    lines = len(MODULES[mod].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{mod}: {lines} lines"
