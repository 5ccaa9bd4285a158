"""The trainer's seam (docs/architecture.md, "The trainer"): the loop, the checkpoint protocol and evaluation
do not know which engine runs. Checked on the source (AST, function-level imports included):

- deepspeed and torch.distributed.checkpoint are imported only in vltrain/engines/ (clusterctl included);
- no code of vltrain outside vltrain/engines/ compares a value with a strategy or checkpoint-format name,
  or probes an engine with hasattr/getattr;
- every engine of the table implements the whole interface, and importing it imports no DeepSpeed.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import pytest

from tests.test_architecture import MODULES, imported_names
from vltrain.engines import ENGINES, engine_class
from vltrain.engines.api import TrainEngine

ENGINE_PACKAGE = "vltrain.engines"
ENGINE_LIBRARIES = ("deepspeed", "torch.distributed.checkpoint")
NAMES = set(ENGINES) | {s.checkpoint_format for s in ENGINES.values()}  # deepspeed, fsdp, ds, dcp


def inside_engines(mod: str) -> bool:
    return mod == ENGINE_PACKAGE or mod.startswith(ENGINE_PACKAGE + ".")


def engine_library_imports(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == lib or n.startswith(lib + ".") for lib in ENGINE_LIBRARIES))


def _constants(node: ast.AST) -> list[str]:
    """String constants a comparison operand stands for: the constant itself, or a tuple/list/set's."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _constants(e)]
    return []


def strategy_comparisons(source: str) -> list[str]:
    """`x == "fsdp"`, `fmt != "ds"`, `s in ("deepspeed", ...)`: each such comparison, unparsed."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(c in NAMES for op in operands for c in _constants(op)):
                out.append(ast.unparse(node))
    return out


def engine_probes(source: str) -> list[str]:
    """hasattr(...engine..., name) / getattr(...engine..., name[, default]) calls, unparsed."""
    out = []
    for node in ast.walk(ast.parse(source)):
        probe = (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
        )
        if probe and node.args and "engine" in ast.unparse(node.args[0]).lower():
            out.append(ast.unparse(node))
    return out


def test_the_checks_can_fail():
    bad = (
        "import deepspeed\n"
        "def f(engine, p, fmt):\n"
        "    from torch.distributed.checkpoint import save\n"
        "    if p.strategy == 'deepspeed' or fmt in ('ds', 'x'): pass\n"
        "    return hasattr(engine, 'stage'), getattr(self.engine, 'close', None)\n"
    )
    path = MODULES["vltrain.loop"].parent / "__seam_probe__.py"
    try:
        path.write_text(bad)
        assert engine_library_imports(imported_names(path)) == ["deepspeed", "torch.distributed.checkpoint.save"]
    finally:
        path.unlink()
    assert len(strategy_comparisons(bad)) == 2
    assert engine_probes(bad) == ["hasattr(engine, 'stage')", "getattr(self.engine, 'close', None)"]
    assert strategy_comparisons("x == 'fsdpx' or y in ('a',)") == [] and engine_probes("getattr(cfg, 'x')") == []


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if not inside_engines(m)))
def test_engine_libraries_are_imported_only_in_vltrain_engines(mod):
    assert engine_library_imports(imported_names(MODULES[mod])) == []


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.startswith("vltrain") and not inside_engines(m)))
def test_no_strategy_name_compared_and_no_engine_probed_outside_the_engines(mod):
    source = MODULES[mod].read_text(encoding="utf-8")
    assert strategy_comparisons(source) == [], f"{mod} asks which engine runs (vltrain.engines.ENGINES has its traits)"
    assert engine_probes(source) == [], f"{mod} probes an engine (vltrain.engines.api.TrainEngine has the method)"


@pytest.mark.parametrize("strategy", sorted(ENGINES))
def test_every_engine_implements_the_whole_interface(strategy):
    cls = engine_class(strategy)
    assert issubclass(cls, TrainEngine) and not inspect.isabstract(cls), inspect.getmembers(cls)
    assert cls.strategy == strategy and cls.checkpoint_format == ENGINES[strategy].checkpoint_format


def test_choosing_an_engine_imports_no_deepspeed():
    """The table and the engine modules import DeepSpeed only when an engine starts (it takes seconds)."""
    code = (
        "import sys; from vltrain.engines import ENGINES, engine_class\n"
        "[engine_class(s) for s in ENGINES]; import vltrain.loop, vltrain.checkpoint, vltrain.evaluate\n"
        "print(sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
