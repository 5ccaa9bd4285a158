"""The layering of docs/architecture.md, checked on the source: every import of every module (AST,
function-level imports included, `if TYPE_CHECKING:` blocks left out since they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("clusterctl", "vltrain")
# Lower layers first; a module may import its own layer and the layers below it, never above.
LAYERS = (
    "vltrain",
    "clusterctl.specs",
    "clusterctl.planning",
    "clusterctl.backends",
    "clusterctl.runs",
    "clusterctl.render",
    "clusterctl.cli",
)
NO_UI = ("vltrain", "clusterctl.specs", "clusterctl.planning", "clusterctl.backends", "clusterctl.runs")
UI_LIBRARIES = ("typer", "rich", "click")
# vltrain's CLI plumbing is the one place below clusterctl that may use typer (both CLIs share it).
UI_ALLOWED = ("vltrain.cli", "vltrain.common.cligroup")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            if ".venv" in p.parts:
                continue
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_names(path: Path) -> set[str]:
    """Absolute dotted names a file imports (from X import y gives X.y; resolved against modules later)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"{node.module}.{a.name}" for a in node.names}  # resolves to X.y, or to X
    return names


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between project modules, every top-level name each module imports)."""

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, external = {}, {}
    for mod, path in modules.items():
        names = imported_names(path)
        edges[mod] = {t for n in names if (t := target(n)) and t != mod}
        external[mod] = {n.split(".")[0] for n in names}
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if mod == prefix or mod.startswith(prefix + "."):
            return i
    return None  # the clusterctl package itself (its __version__): importable from anywhere


MODULES = module_files()
EDGES, EXTERNAL = import_graph(MODULES)


def test_the_checks_can_fail():
    """The cycle finder and the layer ranks catch what they are for (a checker that cannot fail proves nothing)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("clusterctl.cli.cmd_status") > layer("clusterctl.runs.status") > layer("clusterctl.backends.slurm")
    assert layer("vltrain.loop") < layer("clusterctl.specs")
    assert "clusterctl.runs.registry" in EDGES["clusterctl.runs.status"]  # the graph sees real imports


def test_no_import_cycles():
    assert cycles(EDGES) == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down_the_layers(mod):
    own = layer(mod)
    if own is None:
        return
    up = sorted(t for t in EDGES[mod] if (lt := layer(t)) is not None and lt > own)
    assert not up, f"{mod} (layer {LAYERS[own]}) imports {up} from a layer above it"


def test_vltrain_does_not_import_clusterctl():
    assert not [m for m in MODULES if m.startswith("vltrain") and "clusterctl" in EXTERNAL[m]]


def test_command_modules_are_imported_only_by_the_cli_table():
    """Commands never import each other; no other layer reaches into one (they are loaded by name)."""
    commands = {m for m in MODULES if m.startswith("clusterctl.cli.cmd_")}
    assert len(commands) >= 8
    bad = sorted((m, t) for m in MODULES for t in EDGES[m] & commands)
    assert bad == []
    from clusterctl.cli import COMMANDS

    assert {mod for mod, *_ in COMMANDS.values()} == commands  # every command module is in the table


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.startswith(NO_UI) and not m.startswith(UI_ALLOWED)))
def test_lower_layers_do_not_import_typer_or_rich(mod):
    assert not EXTERNAL[mod] & set(UI_LIBRARIES), f"{mod} imports {EXTERNAL[mod] & set(UI_LIBRARIES)}"


def test_run_states_are_defined_once():
    """The state names live in clusterctl.specs.RunState; no other module spells a set of them."""
    offenders = []
    for mod, path in MODULES.items():
        if mod == "clusterctl.specs":
            continue
        text = path.read_text(encoding="utf-8")
        for quoted in ('"COMPLETED"', '"NODE_FAIL"', '"REQUEUED"', '"SUBMITTING"'):
            if quoted in text and mod != "clusterctl.backends.slurm.parse":
                offenders.append((mod, quoted))
    assert offenders == []


def test_run_directory_names_are_spelled_once():
    """File names of the run directory and the job environment live in vltrain.rundir only."""
    needles = (
        '"metrics.jsonl"',
        '"events.jsonl"',
        '"eval.json"',
        '"config.toml"',
        '"plan.json"',
        '"launch.json"',
        '"profile.json"',
        '"ds_config.json"',
        '"checkpoints"',
        '"VLTRAIN_',
        '"CLUSTERCTL_RUN_DIR"',
        '"CLUSTERCTL_PROFILE"',
    )
    offenders = [
        (mod, n)
        for mod, path in MODULES.items()
        if mod != "vltrain.rundir"
        for n in needles
        if n in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_plan_and_submit_take_the_planning_flags_declared_once():
    """cli/options.py PlanningFlags is where the planning flags live: plan and submit both take each
    of them, with the same names, type, default and help (neither lists them itself)."""
    import typing

    from clusterctl.cli import COMMANDS, build_command
    from clusterctl.cli.options import PlanningFlags

    def params(name):
        return {p.name: p for p in build_command(name, *COMMANDS[name][:2]).params}

    plan, submit = params("plan"), params("submit")
    for flag in typing.get_type_hints(PlanningFlags):
        a, b = plan[flag], submit[flag]
        assert (a.opts, a.secondary_opts, a.help, a.default, a.required) == (
            b.opts, b.secondary_opts, b.help, b.default, b.required
        ), flag  # fmt: skip
    for cmd in ("cmd_plan", "cmd_submit"):
        source = MODULES[f"clusterctl.cli.{cmd}"].read_text(encoding="utf-8")
        assert "GLOBAL_BATCH" not in source and '"--global-batch"' not in source, cmd
