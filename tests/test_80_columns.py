"""Every command's human output read in an 80-column terminal: no number or run id cut ("266.…") or
split over two lines, no `clusterctl ...` command or `--flag` group broken across lines.

The commands run as a user runs them (subprocess, COLUMNS=80, no styles) for the five seed profiles,
over a registry of real runs: five `submit`s (one per seed profile, Slurm replaced by PATH shims:
sbatch answers a job id, squeue keeps one run pending with its Reason), whose run directories then
get what a trainer writes (metrics, a resume event, evaluation, energy files, a log). What the
terminal does is simulated: a line longer than 80 characters is folded at column 80.

Checks, on that screen:
- cut: an ellipsis right after text ("266.…", "vl-seed000-2026…");
- run ids: each known run id appears whole as often as its first part and its last part appear (a
  run id cut or split leaves one part without the other);
- split by the fold: a line folded at column 80 inside a word that holds a digit;
- numbers (commands whose output does not depend on the width): every word with a digit printed at
  200 columns is printed whole at 80;
- commands: from each `clusterctl` or `--flag`, the command's words (subcommands, flags and their
  values, run ids, profile/preset/recipe names, placeholders) never continue on the next line.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, deadline

WIDTH = 80
SEEDS = {  # profile: (recipe, preset: the default run name)
    "a100x32": ("seed-000", "vl-seed000"),
    "a100x128": ("seed-001", "vl-30b"),
    "a100x64": ("seed-002", "crossmodal-xl"),
    "h100x128": ("seed-003", "vl-22b"),
    "a100x256": ("seed-004", "vl-seed004"),
}
STATIC = "static"  # output that does not depend on the width but for wrapping: checked against 200 columns too
SUFFIX = r"\d{8}-\d{6}-[0-9a-f]{4}"  # what Registry.new_run_id puts after the name


# --- the world: shims, data, five submitted runs --------------------------------------------------


def _shim(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(0o755)


@pytest.fixture(scope="module")
def world():
    root = Path(tempfile.mkdtemp(prefix="c80-"))  # short: the run dir a submit prints fits 80 columns
    try:
        yield _make_world(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _make_world(root: Path) -> dict:
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    bin_dir = root / "bin"
    bin_dir.mkdir()
    counter = root / "jobid"
    _shim(
        bin_dir,
        "sbatch",
        f'n=$(cat {counter} 2>/dev/null || echo 7000); n=$((n+1)); echo $n > {counter}; echo "Submitted batch job $n"',
    )
    _shim(bin_dir, "srun", "exit 0")
    pending = root / "pending"  # the job ids squeue still holds, one a line
    _shim(
        bin_dir,
        "squeue",
        f'for j in $(cat {pending} 2>/dev/null); do echo "$j|PENDING|0:00|2026-12-09T06:30:00|||0|Priority|"; done',
    )
    _shim(bin_dir, "sacct", "exit 0")
    write_synthetic_shards(root / "data", n=1200, shards=4, seed=0, image_size=32, holdout=300)  # a sample a rank
    train_tokenizer_from_shards(root / "data", 1000, root / "tok.model")
    env = os.environ | {
        "PATH": str(bin_dir),  # no real Slurm: only the shims
        "COLUMNS": str(WIDTH),
        "NO_COLOR": "1",
        "TERM": "dumb",
        "HOME": str(root / "home"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "CLUSTERCTL_REGISTRY": str(root / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": str(root / "runs"),
    }
    env.pop("CLUSTERCTL_PROFILES", None)
    data = ["--set", f"data.shards={root / 'data'}", "--set", f"data.tokenizer={root / 'tok.model'}"]
    data += ["--set", "model.vocab_size=1000"]  # the 1,000-piece tokenizer: a 64k one is minutes to train
    w = {"root": root, "env": env, "cwd": root, "data": data, "runs": {}, "submit": {}}
    mine = (REPO / "cluster_profiles" / "a100x64.toml").read_text().replace('name = "a100x64"', 'name = "mybox"')
    mine = mine.replace("[interconnect]\n", '[interconnect]\nenv = { NCCL_NET_PLUGIN = "/opt/nccl/plugin.so" }\n')
    (root / "cluster_profiles").mkdir()
    (root / "cluster_profiles" / "mybox.toml").write_text(mine)  # a profile of the user's, with a note to show
    for profile in SEEDS:
        out = _run(w, ["submit", "--profile", profile, *data])
        assert out.returncode == 0, out.stdout + out.stderr
        w["submit"][profile] = out.stdout + out.stderr
        run_id = re.search(rf"\S+-{SUFFIX}", out.stdout)[0]
        w["runs"][profile] = run_id
    _finish_runs(w, pending)
    return w


def _finish_runs(w: dict, pending: Path) -> None:
    """What trainers would have left: a completed run that resumed once, a failed one, a cancelled
    one, a pending one (squeue's Reason), a completed one requeued by Slurm."""
    from clusterctl.runs.registry import Registry

    reg = Registry(Path(w["env"]["CLUSTERCTL_REGISTRY"]))
    now = time.time()
    fates = {"a100x32": "COMPLETED", "a100x128": "FAILED", "a100x64": "CANCELLED", "a100x256": "COMPLETED"}
    for profile, run_id in w["runs"].items():
        run = reg.get_run(run_id)
        (job,) = reg.jobs(run_id)
        rd = Path(run.run_dir)
        if profile not in fates:
            pending.write_text(job.job_id + "\n")
            continue
        steps = 40
        rows = [
            {
                "step": s,
                "loss": 9 - s * 0.1,
                "itc": 3 - s * 0.02,
                "mlm": 4 - s * 0.05,
                "caption": 2 - s * 0.02,
                "mim": 0.9 - s * 0.01,
                "lr": 1e-4,
                "samples_per_s": 1234.5,
                "time": now - 3600 + s,
            }
            for s in range(1, steps + 1)
        ]
        (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        events = [{"event": "start", "step": 0, "time": now - 7200}]
        if profile == "a100x32":
            events.append({"event": "resume", "step": 20, "time": now - 3600})
        (rd / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        (rd / "eval.json").write_text(
            json.dumps(
                {
                    "step": steps,
                    "i2t": {"R@1": 0.1234, "R@5": 0.4567},
                    "t2i": {"R@1": 0.1111, "R@5": 0.4444},
                    "cider": 0.321,
                    "chance_r1": 0.0208,
                }
            )
        )
        energy = rd / "energy"
        energy.mkdir(exist_ok=True)
        head = "timestamp,project_name,run_id,duration,emissions,energy_consumed,country_iso_code,pue\n"
        for node in range(2):
            tag = f"node{node:03d}-job{job.job_id}-r0-1"
            (energy / f"{tag}.csv").write_text(head + "x,p,r,3600,12.5,345.6,FRA,1.2\n")
            lines = [
                {"time": now - 3600 + s, "energy_kwh": 345.6 * s / 3600, "co2_kg": 12.5 * s / 3600, "duration_s": s}
                for s in (1200, 2400, 3600)
            ]
            (energy / f"{tag}.timeline.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        log = rd / "submitit" / job.job_id / f"{job.job_id}_0_log.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"step {s}/{steps} | loss {9 - s * 0.1:.4f}\n" for s in range(1, 6)))
        if fates[profile] == "FAILED":
            (rd / "failures").mkdir(exist_ok=True)
            (rd / "failures" / "rank00000.json").write_text(
                json.dumps({"kind": "user", "line": "data.shards: 3 of 4 shards are empty", "job_id": job.job_id})
            )
        fields = {"state": fates[profile], "started_at": now - 7200, "ended_at": now - 3600}
        fields |= {"alloc_gpus": run.gpus, "elapsed_s": 3600.0, "requeues": 2 if profile == "a100x256" else 0}
        reg.update_job(job.job_id, run_id, **fields)
        reg.set_run_state(run_id, fates[profile])


def _run(w: dict, args: list[str], columns: int = WIDTH) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "clusterctl"), *args],
        cwd=w["cwd"],
        env=w["env"] | {"COLUMNS": str(columns)},
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )


# --- what a user sees, and what is wrong with it ---------------------------------------------------


def screen(text: str, width: int = WIDTH) -> tuple[list[str], list[int]]:
    """`text` as an 80-column terminal shows it: each line folded at `width`; and the indices of the
    screen lines that continue a folded line."""
    lines, folded = [], []
    for line in text.split("\n"):
        first = True
        while True:
            if not first:
                folded.append(len(lines))
            lines.append(line[:width])
            line, first = line[width:], False
            if not line:
                break
    return lines, folded


@functools.cache
def _grammar() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The CLI's subcommand names, the options that take a value, and the names a command takes
    (profiles, presets, recipes), from the CLI itself."""
    import typer

    from clusterctl.cli import app
    from clusterctl.planning.presets import PRESETS

    words, valued = set(), set()

    def walk(cmd) -> None:
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and not p.is_flag:
                valued.update(o for o in p.opts if o.startswith("-"))
        for name, sub in getattr(cmd, "commands", {}).items():
            words.add(name)
            walk(sub)

    walk(typer.main.get_command(app))
    names = {p.stem for p in (REPO / "cluster_profiles").glob("*.toml")} | set(PRESETS)
    names |= {p.stem for p in (REPO / "configs").glob("*.toml")} | {"local", "slurm-local", "slurm-local-2x2"}
    return frozenset(words), frozenset(valued), frozenset(names)


def _is_arg(word: str) -> bool:
    """A positional argument of a command: a run id, a known name, a placeholder, a path, key=value."""
    _, _, names = _grammar()
    bare = word.strip("[]")
    return (
        bool(re.search(rf"-{SUFFIX}$", bare))
        or bare in names
        or bool(re.fullmatch(r"[A-Z][A-Z_]+", bare))
        or bare in ("...", "…")
        or "/" in bare
        or "=" in bare
    )


def broken_commands(lines: list[str]) -> list[str]:
    """Commands that go on past the end of a line: from each `clusterctl` or `--flag`, the command's
    words (subcommands, flags, their values, arguments) are read; one read on the next line means
    the command was broken there. Punctuation after a word (`)`, `,`, `;`, `|`) ends the command."""
    words, valued, _ = _grammar()
    tokens = [(i, t) for i, line in enumerate(lines) for t in line.replace("`", " ").split()]
    found = []
    k = 0
    while k < len(tokens):
        line, t = tokens[k]
        if t != "clusterctl" and not re.fullmatch(r"\(?--[a-z][\w-]*", t):
            k += 1
            continue
        t = t.lstrip("(")
        path, need_value, j = t == "clusterctl", t in valued, k + 1
        while j < len(tokens):
            i2, t2 = tokens[j]
            word = t2.rstrip("),;:|.")
            flag = len(word) > 1 and word.startswith("-")
            if t2.endswith(":") or not word or not (need_value or flag or (path and word in words) or _is_arg(word)):
                break  # "warning:", "note:" start a new line of their own
            if i2 != line:
                found.append(f"command broken across lines: {lines[line].strip()!r} / {lines[i2].strip()!r}")
                break
            path = path and word in words
            need_value = flag and word in valued and "=" not in word
            j += 1
            if word != t2:
                break
        k = max(j, k + 1)
    return found


def without_script(text: str) -> str:
    """`text` less the sbatch script `submit --dry-run` prints: the exact file sbatch gets (its
    `#SBATCH --output=<run dir>/...` and `srun ...` lines are as long as the run directory makes
    them; a terminal folds them, `--json`'s `sbatch` holds them whole). Everything around it is checked."""
    out, inside = [], False
    for line in text.split("\n"):
        if line.startswith("sbatch script"):
            inside = True
            continue
        if inside:
            inside = not line.startswith("srun ")
            continue
        out.append(line)
    return "\n".join(out)


def problems(text: str, names: list[str], wide: str | None = None) -> list[str]:
    """What an 80-column terminal shows wrong in `text` (see the module's docstring). `names`: the run
    names whose run ids may appear; `wide`: the same output at 200 columns, for the numbers check."""
    text = without_script(text)
    wide = None if wide is None else without_script(wide)
    lines, folded = screen(text)
    shown = "\n".join(lines)
    out = [f"cut: {m[0]!r}" for m in re.finditer(r"\S{1,20}…", shown)]
    full = re.compile(rf"(?:{'|'.join(map(re.escape, names))})-{SUFFIX}")
    n_full = len(full.findall(shown))
    n_head = len(re.findall(rf"(?:{'|'.join(map(re.escape, names))})-\d", shown))
    n_tail = len(re.findall(rf"(?<![\d]){SUFFIX}", shown))
    if not n_head == n_tail == n_full:
        out.append(f"run id cut or split: {n_full} whole, {n_head} starts, {n_tail} ends")
    for i in folded:
        before, after = lines[i - 1], lines[i]
        if before[-1:].strip() and after[:1].strip():
            word = re.findall(r"\S+$", before)[0] + re.findall(r"^\S+", after)[0]
            if re.search(r"\d", word) or word.startswith("-") or word in _grammar()[0] or _is_arg(word):
                out.append(f"split at column {WIDTH}: {word!r}")
    if wide is not None:
        atoms = lambda s: collections.Counter(
            re.sub(rf"-{SUFFIX}", "-RUNID", w) for w in s.split() if re.search(r"\d", w)
        )
        gone = atoms(wide) - atoms(shown)
        out += [f"number not whole at {WIDTH} columns: {a!r}" for a in sorted(gone)]
    return out + broken_commands(lines)


# --- the commands ------------------------------------------------------------------------------------


def commands(w: dict) -> list[tuple[str, list[str], bool]]:
    """(id, argv, static) for every command's human output, for the five seed profiles and the runs."""
    runs = w["runs"]
    done = [runs[p] for p in ("a100x32", "a100x128", "a100x64", "a100x256")]
    cmds = [
        ("profiles list", ["profiles", "list"], True),
        ("presets list", ["presets", "list"], True),
        ("recipes list", ["recipes", "list"], True),
        ("profiles show (a note)", ["profiles", "show", "mybox"], True),
        ("status", ["status"], False),
        ("status --all", ["status", "--all"], False),
        ("watch (plain)", ["watch", *done, "--interval", "0.2"], False),
        ("report energy", ["report", "energy"], False),
        ("report gpu-hours", ["report", "gpu-hours"], False),
        ("report gpu-hours --by profile", ["report", "gpu-hours", "--by", "profile"], False),
        ("report loss", ["report", "loss", runs["a100x128"]], False),
        ("report eval", ["report", "eval"], False),
        ("compare", ["compare", *done], False),
        ("logs", ["logs", runs["a100x32"]], False),
    ]
    for profile, (recipe, preset) in SEEDS.items():
        cmds += [
            (f"profiles show {profile}", ["profiles", "show", profile], True),
            (f"presets show {preset}", ["presets", "show", preset], True),
            (f"recipes show {recipe}", ["recipes", "show", recipe], True),
            (f"plan {profile}", ["plan", "--profile", profile], True),
            (f"estimate {profile}", ["estimate", "--profile", profile, "--duration", "6w"], True),
            (f"submit --dry-run {profile}", ["submit", "--profile", profile, *w["data"], "--dry-run"], False),
        ]
    cmds += [
        (
            "estimate claims",
            [
                "estimate",
                "--profile",
                "a100x64",
                "--samples",
                "1.8B",
                "--model",
                "crossmodal-xl",
                "--activation-checkpointing",
                "--claimed-duration",
                "6w",
            ],
            True,
        ),
        (
            "estimate gpu-hours claim",
            ["estimate", "--profile", "a100x32", "--duration", "6w", "--claimed-gpu-hours", "750000"],
            True,
        ),
    ]
    return cmds


COMMAND_IDS = [c[0] for c in commands({"runs": collections.defaultdict(str), "data": []})] + [
    f"submit {p}" for p in SEEDS
]


@pytest.mark.parametrize("case", COMMAND_IDS)
def test_every_command_reads_whole_at_80_columns(world, case):
    names = [preset for _, preset in SEEDS.values()]
    if case.startswith("submit ") and "--dry-run" not in case:
        text, wide = world["submit"][case.split()[1]], None
    else:
        _, argv, static = next(c for c in commands(world) if c[0] == case)
        r = _run(world, argv)
        text = r.stdout + r.stderr
        assert "Traceback" not in text and r.returncode in (0, 1, 2), text[-3000:]
        assert text.strip(), f"{case}: printed nothing (exit {r.returncode})"
        wide = None
        if static:
            rw = _run(world, argv, columns=200)
            wide = rw.stdout + rw.stderr
    found = problems(text, names, wide)
    assert not found, f"{case} at {WIDTH} columns:\n" + "\n".join(found) + "\n---\n" + text


# --- the checks themselves ---------------------------------------------------------------------------


def test_the_checks_catch_what_the_issue_saw():
    """Each defect the issue reported, written as the old output had it, is caught."""
    names = ["demo", "vl-seed000"]
    rid = "vl-seed000-20261206-231029-579b"
    assert problems("│ base  │ 266.… │ 32,0… │", names)  # presets list cut every number
    assert problems(f" {rid[:24]}\n {rid[24:]}   4   200", names)  # report energy wrapped run ids
    assert problems(f"  follow   clusterctl status {rid}   |   clusterctl logs\n{rid} --follow", names)
    assert problems(f"  follow   clusterctl status\n{rid}", names)
    assert problems(f" {rid[:20]}…  COMPLETED  0  1  40/40", names)  # status cut run ids
    long = "x" * 75 + " 1,234,567 kWh"
    assert problems(long, names)  # the terminal folds inside a number
    assert problems("faster: ZeRO-0 (--zero-stage 0 --micro-batch 64\n--accum 1)", names)
    assert problems("a", names, wide="a 12.5 GiB")  # a number gone at 80 columns


def test_the_checks_pass_whole_output():
    names = ["vl-seed000"]
    rid = "vl-seed000-20261206-231029-579b"
    ok = f"  follow   clusterctl status {rid}\n           clusterctl logs {rid} --follow\n 0.8M  32/4  1,000"
    assert problems(ok, names, wide=ok) == []
    assert problems("run clusterctl plan --profile a100x32 and then\n12 more lines", names) == []


def test_tables_fit_by_moving_keys_and_wrapping_values_never_by_cutting():
    """render.text.table_text at 80 columns: a long key goes whole on its own line, a long last value
    wraps at spaces in its column; every word comes back whole and in order."""
    from clusterctl.render.text import table_text

    rid = "crossmodal-xl-20261206-231606-7b51"
    keys = [rid, "GPU energy", "node energy"]
    values = [
        "1,008.0 h",
        "134,185 kWh",
        "138,378 kWh besides GPUs (32 nodes x 3,300 W x PUE 1.3; default for A100, assumed)",
    ]
    for width in (40, 60, 80):
        text = table_text("t", [[], []], [keys, values], [False, True], width)
        assert problems(text, ["crossmodal-xl"]) == [], text
        assert max(map(len, text.splitlines())) <= max(width, len(rid) + 1), text
        assert text.split() == ["t", *" ".join(f"{k} {v}" for k, v in zip(keys, values)).split()] or width == 40
    assert table_text("t", [[], []], [keys, values], [False, True], None).count("\n") == 5  # piped: as it is
