"""The docs' figures are the tool's: marked parts of README.md, docs/planning.md and docs/recipes.md
are made from what clusterctl prints today, and this test fails when one differs.

Markers (HTML comments: invisible on GitHub):

    <!-- clusterctl: ARGS -->          the human output of `clusterctl ARGS` at 80 columns, in a
    ```text ... ```                    text block, then <!-- end -->
    <!-- table: NAME -->               a markdown table made by TABLES[NAME] from `--json` output,
    | ... |                            then <!-- end -->
    <!-- generated: gpu-status -->     the README's GPU line, from docs/gpu-status.md's table
    <!-- fig: ARGS | KEY | FORMAT -->VALUE<!-- /fig -->
                                       one figure in prose: KEY (dotted, list indices as numbers) of
                                       `clusterctl ARGS --json`, formatted with FORMAT (Python's
                                       format spec, e.g. .2f, .0%, ",")

Regenerate every marked part after a change to what the tool prints:

    .venv/bin/python -m tests.test_docs_figures --write

Commands run as a new user's would: in an empty directory with a private registry and config
directory, so no clone's ./configs or registry changes what they print.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = ("README.md", "docs/planning.md", "docs/recipes.md")
GPU_STATUS = REPO / "docs" / "gpu-status.md"
SEED_PROFILES = ("a100x32", "a100x128", "a100x64", "h100x128", "a100x256")

BLOCK = re.compile(r"<!-- (clusterctl|table|generated): (.+?) -->\n(.*?)<!-- end -->\n", re.DOTALL)
FIG = re.compile(r"<!-- fig: (.+?) -->(.*?)<!-- /fig -->", re.DOTALL)


# --- running the tool --------------------------------------------------------------------------


@functools.cache
def _home() -> Path:
    return Path(tempfile.mkdtemp(prefix="docs-figures-"))


def _cli(args: list[str], columns: str = "80") -> subprocess.CompletedProcess:
    home = _home()
    env = os.environ | {
        "COLUMNS": columns,
        "NO_COLOR": "1",
        "TERM": "dumb",
        "HOME": str(home / "home"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "CLUSTERCTL_REGISTRY": str(home / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": str(home / "runs"),
    }
    env.pop("CLUSTERCTL_PROFILES", None)
    work = home / "cwd"
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [str(BIN / "clusterctl"), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )


@functools.cache
def run(args: str) -> str:
    """What `clusterctl ARGS` prints (stdout, then stderr) at 80 columns without styles; exit 0, 1 or 2
    (a refused claim is a figure too), never a traceback."""
    r = _cli(shlex.split(args))
    if r.returncode not in (0, 1, 2) or "Traceback" in r.stderr:
        raise RuntimeError(f"clusterctl {args}: exit {r.returncode}: {r.stderr[-2000:]}")
    out = r.stdout + r.stderr
    return "\n".join(line.rstrip() for line in out.rstrip("\n").split("\n")) + "\n"


@functools.cache
def run_json(args: str) -> Any:
    """`clusterctl ARGS --json`, parsed."""
    r = _cli([*shlex.split(args), "--json"])
    if not r.stdout.strip():
        raise RuntimeError(f"clusterctl {args} --json: exit {r.returncode}, no JSON: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def key_of(data: Any, key: str) -> Any:
    """`a.b.0.c` of JSON data."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


# --- what a block holds ------------------------------------------------------------------------


def _engine(strategy: str, zero: int) -> str:
    return f"ZeRO-{zero}" if strategy == "deepspeed" else f"FSDP zero_stage {zero}"


def _layout(p: dict[str, Any]) -> str:
    bits = [_engine(p["strategy"], p["zero_stage"])]
    if p["tensor_parallel"] > 1 or p["pipeline_parallel"] > 1:
        pp = f" x pp {p['pipeline_parallel']} ({p['pp_schedule']})" if p["pipeline_parallel"] > 1 else ""
        bits.append(f"tp {p['tensor_parallel']}{pp}")
    bits.append(f"micro {p['micro_batch']} x accumulation {p['accumulation']} x dp {p['data_parallel']}")
    if p["activation_checkpointing"]:
        bits.append("checkpointing")
    return ", ".join(bits)


def _faster(p: dict[str, Any]) -> str:
    f = p["faster_layout"]
    if not f:
        return "none"
    sharding = f" {f['sharding']} sharding" if f.get("sharding") else ""
    runs = "" if f.get("trainer_runs", True) else "; not run by the trainer"
    return (
        f"{_engine(p['strategy'], f['zero_stage'])}{sharding}, {f['micro_batch']} x {f['accumulation']}: "
        f"{f['total_s']:.2f} s ({f['speedup']:.2f}x{runs})"
    )


def seeds_at_scale() -> str:
    """docs/planning.md, "The seeds at scale": each seed profile's recipe as `plan` lays it out."""
    rows = [
        "| profile | recipe layout | GPU memory (GiB) | step: compute / exposed comm / tp x pp / total (s) "
        "| expected MFU | faster layout | checkpoint |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in SEED_PROFILES:
        p = run_json(f"plan --profile {name}")
        m, st, ck = p["memory"], p["step_time"], p["checkpoint"]
        seed = run_json(f"profiles show {name}").get("seed") or "-"
        rows.append(
            f"| {name} ({seed}) | {_layout(p)} | {m['total_gib']:.1f} of {m['capacity_gib']:g} "
            f"({m['total_gib'] / m['capacity_gib']:.0%}) | {st['compute_s']:.2f} / {st['exposed_communication_s']:.2f} / "
            f"{st.get('parallel_s') or 0:.2f} / {st['total_s']:.2f} | {p['mfu_expected']:.0%} | {_faster(p)} | "
            f"{ck['bytes'] / 1e9:,.0f} GB, {ck['write_s']:.0f} s; every {ck['checkpoint_every']} steps, "
            f"{ck['overhead']:.1%} |"
        )
    return "\n".join(rows) + "\n"


BATCH_SPLITS = (
    ("000", "plan --profile a100x32 --model base --global-batch 2048 --accum 8"),
    ("001", "plan --profile a100x128 --model vl-30b --global-batch 2048 --accum 8 --zero-stage 3"),
    (
        "003",
        "plan --profile h100x128 --model vl-22b --global-batch 2048 --accum 16 --set parallel.strategy=fsdp "
        "--zero-stage 2 --tp 4 --pp 2",
    ),
    ("004", "plan --profile a100x256 --model vl-seed004 --global-batch 2048 --activation-checkpointing"),
    ("002", "plan --profile a100x64 --model crossmodal-xl --global-batch 8192 --activation-checkpointing"),
)


def batch_splits() -> str:
    """docs/planning.md, "Batch split": how `plan` splits each seed's global batch."""
    rows = ["| seed | command | micro batch x accumulation x dp | per GPU per step |", "| --- | --- | --- | --- |"]
    for seed, args in BATCH_SPLITS:
        p = run_json(args)
        rows.append(
            f"| {seed} | `{args}` | {p['micro_batch']} x {p['accumulation']} x {p['data_parallel']} "
            f"| {p['samples_per_gpu_per_step']} |"
        )
    return "\n".join(rows) + "\n"


def fsdp_seeds() -> str:
    """docs/planning.md, FSDP section: seeds 001 and 003 under FSDP, term by term."""
    plans = {
        f"seed {run_json(f'profiles show {n}')['seed']}, {n}": run_json(f"plan --profile {n}")
        for n in ("a100x128", "h100x128")
    }
    rows = [f"| | {' | '.join(plans)} |", "| --- |" + " --- |" * len(plans)]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        rows.append(f"| {label} | {' | '.join(cell(p) for p in plans.values())} |")

    row("layout", _layout)
    row(
        "gathered weights / grads sharded / unsharded grads / master + Adam / activations (GiB)",
        lambda p: " / ".join(
            f"{p['memory'][k]:.2f}"
            for k in ("params_gib", "grads_gib", "grad_accum_gib", "optimizer_gib", "activations_gib")
        ),
    )
    row(
        "total per GPU",
        lambda p: (
            f"{p['memory']['total_gib']:.1f} of {p['memory']['capacity_gib']:g} GiB ({p['memory']['total_gib'] / p['memory']['capacity_gib']:.0%})"
        ),
    )
    row(
        "step: compute / dp comm exposed / tp x pp / total",
        lambda p: (
            " / ".join(
                f"{p['step_time'][k] or 0:.2f}"
                for k in ("compute_s", "exposed_communication_s", "parallel_s", "total_s")
            )
            + f" s (MFU {p['mfu_expected']:.0%})"
        ),
    )
    row("faster layout", _faster)
    return "\n".join(rows) + "\n"


def twins() -> str:
    """docs/recipes.md, "Reduced twins": what each twin's resolved config runs ("planned": the
    accumulation `plan` chooses, 0 in the config)."""
    rows = [
        "| twin | precision | steps (warm-up) | global batch | accumulation | strategy | tp x pp |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in range(5):
        c = run_json(f"recipes show seed-00{n}-tiny")["config"]
        par = c["parallel"]
        rows.append(
            f"| `seed-00{n}-tiny` | {c['precision']} | {c['steps']} ({c['optim']['warmup_steps']}) | {c['global_batch']} "
            f"| {c['accumulation'] or 'planned'} | {par['strategy']} | {par['tp']} x {par['pp']} |"
        )
    return "\n".join(rows) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "twins": twins,
    "seeds-at-scale": seeds_at_scale,
    "batch-splits": batch_splits,
    "fsdp-seeds": fsdp_seeds,
}


def gpu_rows(text: str) -> list[dict[str, str]]:
    """The rows of docs/gpu-status.md's table (between its markers)."""
    part = text.split("<!-- gpu-status table", 1)[1].split("<!-- end gpu-status table -->", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def gpu_summary(rows: list[dict[str, str]]) -> str:
    """The README's one line about GPUs, from the table: what ran on one, and what did not."""
    ran = [r for r in rows if r["on a GPU"].startswith("yes")]
    never = [r["part"] for r in rows if not r["on a GPU"].startswith("yes")]
    link = "what ran where: [docs/gpu-status.md](docs/gpu-status.md)"
    if not ran:
        line = (
            f"**GPU status: nothing here has run on a GPU yet.** Tested on CPU only: {', '.join(never)}; "
            f"the paper-scale figures are the planner's, never measured ({link})."
        )
    else:
        done = "; ".join(f"{r['part']} ({r['on a GPU'][4:].strip()})" for r in ran)
        rest = f" Not yet on a GPU: {', '.join(never)}." if never else ""
        line = f"**GPU status:** run on a GPU: {done}.{rest} ({link})."
    return textwrap.fill(line, 100, break_long_words=False, break_on_hyphens=False) + "\n"


def render(kind: str, spec: str) -> str:
    """What the block `<!-- kind: spec -->` holds today."""
    if kind == "clusterctl":
        return f"```text\n$ clusterctl {spec}\n{run(spec)}```\n"
    if kind == "table":
        return TABLES[spec]()
    if kind == "generated" and spec == "gpu-status":
        return gpu_summary(gpu_rows(GPU_STATUS.read_text()))
    raise ValueError(f"unknown block <!-- {kind}: {spec} -->")


def render_fig(spec: str) -> str:
    """A figure: FORMAT is Python's format spec, or one ending in M or B for millions or billions
    (".0fM": 291M)."""
    args, key, fmt = (s.strip() for s in spec.split("|"))
    value = key_of(run_json(args), key)
    scale = {"M": 1e6, "B": 1e9}.get(fmt[-1:])
    return format(value / scale, fmt[:-1]) + fmt[-1] if scale else format(value, fmt)


def regenerate(text: str) -> str:
    """`text` with every marked block and figure made again from the tool."""
    text = BLOCK.sub(lambda m: f"<!-- {m[1]}: {m[2]} -->\n{render(m[1], m[2])}<!-- end -->\n", text)
    return FIG.sub(lambda m: f"<!-- fig: {m[1]} -->{render_fig(m[1])}<!-- /fig -->", text)


def blocks(doc: str) -> list[tuple[str, str, str]]:
    text = (REPO / doc).read_text()
    return [(m[1], m[2], m[3]) for m in BLOCK.finditer(text)] + [("fig", m[1], m[2]) for m in FIG.finditer(text)]


CASES = [(doc, kind, spec, body) for doc in DOCS for kind, spec, body in blocks(doc)]


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "kind", "spec", "body"), CASES, ids=[f"{c[0]}:{c[1]}:{c[2][:60]}" for c in CASES])
def test_a_marked_figure_is_what_the_tool_prints_today(doc, kind, spec, body):
    want = render_fig(spec) if kind == "fig" else render(kind, spec)
    if body != want:
        diff = "\n".join(difflib.unified_diff(body.splitlines(), want.splitlines(), "doc", "tool", lineterm=""))
        pytest.fail(
            f"{doc}: <!-- {kind}: {spec} --> differs from the tool's output today; "
            f"run `.venv/bin/python -m tests.test_docs_figures --write`\n{diff}"
        )


def test_each_doc_has_its_generated_parts():
    """The parts the issue names are marked (a marker removed would silently stop the checking)."""
    kinds = {doc: {(k, s) for k, s, _ in blocks(doc)} for doc in DOCS}
    assert ("generated", "gpu-status") in kinds["README.md"]
    assert ("table", "seeds-at-scale") in kinds["docs/planning.md"]
    assert ("table", "batch-splits") in kinds["docs/planning.md"]
    assert any(k == "clusterctl" and s.startswith("estimate") for k, s in kinds["docs/planning.md"])
    assert any(k == "fig" for k, _ in kinds["docs/recipes.md"])


def test_the_readme_says_on_its_first_screen_what_has_run_on_a_gpu():
    readme = (REPO / "README.md").read_text().splitlines()
    first = "\n".join(readme[:25])
    assert "<!-- generated: gpu-status -->" in first and "GPU status" in first, "\n".join(readme[:25])
    assert "docs/gpu-status.md" in first


def test_the_gpu_line_follows_the_gpu_status_table():
    """The README's line is made from the table: a row turned to `yes:` changes it."""
    rows = gpu_rows(GPU_STATUS.read_text())
    assert rows and all(r["on a GPU"] == "no" or r["on a GPU"].startswith("yes:") for r in rows), rows
    before = gpu_summary(rows)
    flat = " ".join(before.split())
    assert "nothing here has run on a GPU yet" in flat and all(r["part"] in flat for r in rows)
    rows[0]["on a GPU"] = "yes: H100 80GB, 2026-12-07, abc1234"
    after = gpu_summary(rows)
    assert "nothing" not in after and f"{rows[0]['part']} (H100 80GB, 2026-12-07, abc1234)" in " ".join(after.split())


def test_the_gpu_figures_in_trainer_md_follow_the_gpu_check_row():
    """docs/trainer.md's "Measured on a GPU" table says "not measured" exactly while the gpu_check row
    here says no: a figure there with no GPU run behind it, or a GPU run not written there, fails."""
    row = next(r for r in gpu_rows(GPU_STATUS.read_text()) if "gpu_check" in r["part"])
    section = (REPO / "docs" / "trainer.md").read_text().split("### Measured on a GPU", 1)[1].split("\n#", 1)[0]
    cells = [line.strip("|").split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    values = [v for v in cells[1:] if v != "---"]  # less the header and its rule
    assert values, section
    measured = row["on a GPU"].startswith("yes")
    assert all((v != "not measured") == measured for v in values), (row, values)


def test_a_changed_figure_is_caught():
    """The check compares what is written: a doc whose figure drifted from the tool fails."""
    text = "x <!-- fig: presets show tiny | params | , -->1<!-- /fig --> y\n"
    assert regenerate(text) != text
    fixed = regenerate(text)
    assert regenerate(fixed) == fixed and f"{run_json('presets show tiny')['params']:,}" in fixed


def main() -> None:
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_docs_figures --write")
    for doc in DOCS:
        path = REPO / doc
        old = path.read_text()
        new = regenerate(old)
        if new != old:
            path.write_text(new)
            print(f"rewrote {doc}")


if __name__ == "__main__":
    main()
