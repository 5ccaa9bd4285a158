"""Typed-dataclass validation for TOML files (cluster profiles, train configs).

Why hand-written and not pydantic: every error must be exactly one line naming the file, the dotted
field and what is allowed, and the CLI's start-up must stay near typer's own import time (pydantic
adds ~0.2 s). This module is ~230 lines over dataclasses and typing, with no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from vltrain.common.errors import UserError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field accepts, beyond its type."""

    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    allowed: str | None = None  # words for the error message when a pattern/check fails
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None when fine
    max_items: int | None = None  # a list's or table's length, checked before any item is


def field(
    doc: str = "",
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
    pattern: str | None = None,
    allowed: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    max_items: int | None = None,
) -> Any:
    """A dataclass field that carries its doc and its constraints."""
    spec = Spec(doc, min, max, choices, pattern, allowed, check, max_items)
    kw: dict[str, Any] = {"metadata": {"spec": spec}}
    if default is not _MISSING:
        kw["default"] = default
    if default_factory is not _MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _num(x: float) -> str:
    """A bound as people write it: 10,000,000 and 0.001, not 1e+07 and 1e-03 (exponents from 1e-9)."""
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:g}" if abs(x) < 1e-4 else f"{x:.6f}".rstrip("0")


def _range_words(spec: Spec, tp: Any) -> str:
    kind = "an integer" if tp is int else "a number"
    if spec.min is not None and spec.max is not None:
        return f"{kind} from {_num(spec.min)} to {_num(spec.max)}"
    if spec.min is not None:
        return f"{kind} >= {_num(spec.min)}"
    if spec.max is not None:
        return f"{kind} <= {_num(spec.max)}"
    return kind


def _fail(where: str, name: str, problem: str, allowed: str) -> UserError:
    return UserError(f"{where}: {name}: {problem}; allowed: {allowed}")


def _coerce(tp: Any, value: Any, spec: Spec, where: str, name: str) -> Any:
    """Check one value against its type and spec; return it in its final form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _coerce(_union_arm(tp, value), value, spec, where, name)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(where, name, f"{_describe(value)} is not a table", f"a table [{name}]")
        return build(tp, value, where, prefix=f"{name}.")
    if origin is dict:
        return _coerce_table(tp, value, spec, where, name)
    if origin in (list, tuple):
        return _coerce_list(tp, value, spec, where, name)
    value = _coerce_scalar(tp, value, spec, where, name)
    _check_spec(tp, value, spec, where, name)
    return value


def _union_arm(tp: Any, value: Any) -> Any:
    """The arm of a union (or Optional) a value other than None is checked against: the first arm,
    but a table picks the first dataclass arm (e.g. model: preset name | [model])."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(value, Mapping):
        args = [a for a in args if dataclasses.is_dataclass(a)] or args
    return args[0]


def _coerce_table(tp: Any, value: Any, spec: Spec, where: str, name: str) -> dict[Any, Any]:
    """A dict[str, T] field: every value checked as T, then the whole table by spec.check."""
    if not isinstance(value, Mapping):
        raise _fail(where, name, f"{_describe(value)} is not a table", "a table of names to strings")
    _check_length(value, spec, where, name)
    _, vtp = typing.get_args(tp)
    out = {}
    for k, v in value.items():
        out[k] = _coerce(vtp, v, Spec(), where, f"{name}.{k}")
    _run_check(out, spec, where, name)
    return out


def _coerce_list(tp: Any, value: Any, spec: Spec, where: str, name: str) -> list[Any] | tuple[Any, ...]:
    """A list[T] or tuple[T, ...] field from a TOML list; a list of strings checks each item by spec."""
    if not isinstance(value, list):
        raise _fail(where, name, f"{_describe(value)} is not a list", spec.allowed or "a list")
    _check_length(value, spec, where, name)
    (etp,) = typing.get_args(tp)[:1]
    items = [_coerce(etp, v, spec if etp is str else Spec(), where, f"{name}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _check_length(value: list[Any] | Mapping[str, Any], spec: Spec, where: str, name: str) -> None:
    """A list or table longer than spec.max_items is refused before its items cost anything."""
    if spec.max_items is not None and len(value) > spec.max_items:
        what = "entries" if isinstance(value, list) else "keys"
        raise _fail(where, name, f"{len(value):,} {what} are too many", f"at most {spec.max_items:,} {what}")


def _coerce_scalar(tp: Any, value: Any, spec: Spec, where: str, name: str) -> Any:
    """A bool, int, float or str of exactly that type (an int is a number too; a bool is neither); floats finite."""
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise _fail(where, name, f"{_describe(value)} is not {_type_name(tp)}", spec.allowed or _type_name(tp))
    if tp is float:
        value = float(value)
        if not math.isfinite(value):  # NaN compares false with every bound: refuse it before the range
            raise _fail(
                where,
                name,
                f"{_describe(value)} is not a finite number",
                _range_words(spec, tp) if spec.min is not None or spec.max is not None else "a finite number",
            )
    return value


def _check_spec(tp: Any, value: Any, spec: Spec, where: str, name: str) -> None:
    """A scalar against its spec: choices, then range, then pattern, then the field's own check."""
    if spec.choices is not None and value not in spec.choices:
        raise _fail(where, name, f"{_describe(value)} is not a known value", ", ".join(map(str, spec.choices)))
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        raise _fail(where, name, f"{_describe(value)} is out of range", _range_words(spec, tp))
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise _fail(where, name, f"{_describe(value)} is not valid", spec.allowed or f"text matching {spec.pattern}")
    _run_check(value, spec, where, name)


def _run_check(value: Any, spec: Spec, where: str, name: str) -> None:
    """spec.check's problem, if any, as a UserError."""
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise _fail(where, name, problem, spec.allowed or spec.doc)


def build(cls: type, data: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a parsed TOML mapping, refusing unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(f"{where}: {prefix}{unknown[0]}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        spec: Spec = f.metadata.get("spec", Spec())
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                tp = hints[name]
                raise UserError(
                    f"{where}: {prefix}{name}: missing; allowed: {spec.allowed or _type_name(tp)}"
                    + (f" ({spec.doc})" if spec.doc else "")
                )
            continue
        kwargs[name] = _coerce(hints[name], data[name], spec, where, prefix + name)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON-able data."""
    return dataclasses.asdict(obj)


# Tables and lists inside one another, the root table counted: a config needs 4 ([[stages]] -> loss).
# tomllib recurses once per level (some hundreds of brackets are a RecursionError), and merging a
# `base` chain or copying overrides recurses over the result.
MAX_DEPTH = 16


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """tomllib.loads with one-line errors and the nesting bound MAX_DEPTH (pure)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: invalid TOML: {e}") from None
    except RecursionError:  # before the depth can be counted: the parser itself gave up
        raise _fail(where, "nesting", "too deep for the TOML parser", depth_words()) from None
    check_depth(data, where)
    return data


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse tables and lists nested deeper than `limit` (the root counts as 1); iterative, so any
    depth is counted without recursing."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if depth > limit:
            raise _fail(where, "nesting", f"tables and lists nested more than {limit} deep", depth_words(limit))
        if isinstance(v, Mapping):
            todo.extend((x, depth + 1) for x in v.values() if isinstance(x, (Mapping, list)))
        elif isinstance(v, list):
            todo.extend((x, depth + 1) for x in v if isinstance(x, (Mapping, list)))


def depth_words(limit: int = MAX_DEPTH) -> str:
    return f"tables and lists nested at most {limit} deep (train configs and profiles use 4 at most)"
